"""The on-disk contract of a checkpoint folder, apart from what goes into it.

A checkpoint is written as ``step-N.tmp``; once every rank's shards and DCP's ``.metadata`` are
on disk, rank 0 writes a ``COMPLETE`` marker into it (synced, holding the CRC-32 of every file)
and renames it to ``step-N``. Only a ``step-N`` folder with the marker, a readable ``.metadata``
and every data file it names, at full length, counts as a checkpoint; anything else is reported
and skipped. A save killed at any point thus leaves the previous checkpoint the newest. Before a
checkpoint is loaded its content is verified too (``content_problem``): a complete checkpoint
whose bytes changed since is refused, never skipped silently. These rules (and the choice of the
checkpoint a run resumes from) live apart from the saving and loading because ``tetrad convert``
and the trainer's start-up, before any model is built, apply them too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from tetrad.components.checkpoint_storage import (
    CRC32_SUFFIX,
    MetadataRefused,
    file_crc32,
    read_metadata_file,
)
from tetrad.config.job_config import CheckpointConfig
from tetrad.errors import CheckpointError
from tetrad.models.lora import is_adapter

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
"""Marker file, written last into a finished checkpoint."""

_STEP_DIR = re.compile(r"^step-(\d+)(\.tmp)?$")


def step_folder(folder: Path, step: int, *, tmp: bool = False) -> Path:
    """Where step ``step``'s checkpoint lives (``tmp``: while it is being written)."""
    return folder / (f"step-{step}.tmp" if tmp else f"step-{step}")


def step_of(path: Path) -> int | None:
    """N of a ``step-N`` (or ``step-N.tmp``) folder; None for any other name."""
    m = _STEP_DIR.match(path.name)
    return int(m[1]) if m else None


def complete_steps(folder: Path, *, report: bool = False) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first; with ``report``, log (on
    rank 0) every step folder that is skipped and why."""
    if not folder.is_dir():
        return []
    steps = []
    for path in sorted(folder.iterdir()):
        if (step := step_of(path)) is None:
            continue
        if problem := checkpoint_problem(path):
            if report and (not dist.is_initialized() or dist.get_rank() == 0):
                logger.warning("skipping checkpoint %s: %s", path, problem)
        else:
            steps.append(step)
    return sorted(steps)


def resume_source(config: CheckpointConfig, folder: Path) -> Path | None:
    """The checkpoint a run starts from: with --checkpoint.enable the chosen
    (--checkpoint.load_step) or latest complete one in its own ``folder``, else a DCP
    --checkpoint.initial_load_path; None: start from scratch (or from HF weights, which the
    trainer loads). Its content is verified (collective under a process group: each rank reads
    a share); a corrupt latest checkpoint stops the run rather than resuming silently from an
    older one. Logs skipped folders on rank 0."""
    if config.enable and config.load_step >= 0:
        path = step_folder(folder, config.load_step)
        if problem := checkpoint_problem(path, verify=True):
            raise CheckpointError(f"--checkpoint.load_step {config.load_step}: {path}: {problem}")
        return path
    if config.enable and (steps := complete_steps(folder, report=True)):
        path = step_folder(folder, steps[-1])
        if problem := content_problem(path):
            before = f"from {step_folder(folder, steps[-2])}" if len(steps) > 1 else "afresh"
            raise CheckpointError(
                f"checkpoint {path}: {problem}; move it out of {folder} to start {before}"
            )
        return path
    if config.initial_load_path and not config.initial_load_in_hf:
        path = Path(config.initial_load_path)
        if problem := checkpoint_problem(path, need_marker=False, verify=True):
            raise CheckpointError(f"--checkpoint.initial_load_path {path}: {problem}")
        return path
    return None


def will_load_model(config: CheckpointConfig, source: Path | None) -> bool:
    """Whether ``CheckpointManager.load`` will load the model's (base) weights from ``source``
    (from ``resume_source``), or from ``base_source`` when ``source`` holds LoRA adapters only,
    so the trainer need not initialise or load them otherwise. A seed checkpoint run never
    loads."""
    if source is None or config.create_seed_checkpoint:
        return False
    if "model" in config.exclude_from_loading:
        return False
    held = model_keys(read_metadata(source))
    if any(not is_adapter(fqn) for fqn in held):
        return True
    return bool(held) and base_source(config, source) is not None


def model_keys(metadata: Metadata) -> list[str]:
    """The FQNs of the model's tensors a checkpoint holds."""
    return [
        k.removeprefix("model.") for k in metadata.state_dict_metadata if k.startswith("model.")
    ]


def base_source(config: CheckpointConfig, source: Path) -> Path | None:
    """Where the frozen base of a LoRA run comes from when ``source`` holds its adapters only
    (--lora.save_adapters_only): the DCP --checkpoint.initial_load_path the run started from;
    None = the run's other start (seed initialisation or Hugging Face weights)."""
    initial = config.initial_load_path
    if initial is None or config.initial_load_in_hf or Path(initial).resolve() == source.resolve():
        return None
    return Path(initial)


def checkpoint_problem(path: Path, *, need_marker: bool = True, verify: bool = False) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint; None if it is one. Checks names, sizes
    and the metadata; ``verify``: the content too (``content_problem``, a collective under a
    process group)."""
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        return "it is not a folder"
    if path.name.endswith(".tmp"):
        return "it is a save that did not finish (temporary name)"
    if need_marker and not (path / COMPLETE).is_file():
        return f"it has no {COMPLETE} marker (a save that did not finish)"
    if not (path / ".metadata").is_file():
        return "it is not a DCP checkpoint (no .metadata file)"
    try:
        metadata = read_metadata_file(path / ".metadata")
    except MetadataRefused as e:
        return str(e)
    except Exception as e:  # a truncated or foreign file: report, never load
        return f"its .metadata cannot be read ({type(e).__name__})"
    try:
        recorded = recorded_crc32(path)
    except ValueError:
        return f"its {COMPLETE} marker cannot be read"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"its data file {name} is missing"
        if file.stat().st_size < size:
            return f"its data file {name} is truncated"
        if recorded is not None and name not in recorded:
            return f"its {COMPLETE} marker records no checksum of its data file {name}"
    return content_problem(path) if verify else None


def recorded_crc32(path: Path) -> dict[str, int] | None:
    """The CRC-32 of each file of a checkpoint, from its marker; None for a checkpoint saved
    without them (before tetrad recorded them, or by another tool). ValueError: unreadable."""
    marker = path / COMPLETE
    if not marker.is_file():
        return None
    crcs = json.loads(marker.read_text()).get("crc32")
    if crcs is not None and not all(isinstance(v, int) for v in crcs.values()):
        raise ValueError(f"{marker}: checksums are not integers")
    return crcs


def content_problem(path: Path) -> str | None:
    """Whether every file of a checkpoint still holds the bytes it was saved with (the CRC-32s
    in its marker). Under a process group this is a collective: each rank reads a share of the
    files, so the checkpoint is read once in all, and every rank gets the same verdict. A
    checkpoint without checksums passes, with a warning."""
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        recorded = recorded_crc32(path)
    except ValueError:
        return f"its {COMPLETE} marker cannot be read"
    if recorded is None:
        if rank == 0:
            logger.warning(
                "checkpoint %s records no checksums (saved before tetrad recorded them, or by "
                "another tool): loading it unverified", path,
            )  # fmt: skip
        return None
    begin, names = time.perf_counter(), sorted(recorded)
    mine = {name: _file_problem(path, name, recorded[name]) for name in names[rank::world]}
    shares = [mine]
    if distributed:
        shares = [{}] * world
        dist.all_gather_object(shares, mine)
    found = {name: p for share in shares for name, p in share.items() if p is not None}
    if not found and rank == 0:
        logger.info(
            "verified %s: %d files match their checksums (%.1f s, read by %d rank(s))",
            path, len(names), time.perf_counter() - begin, world,
        )  # fmt: skip
    return found[min(found)] if found else None


def _file_problem(path: Path, name: str, crc: int) -> str | None:
    try:
        actual = file_crc32(path / name)
    except FileNotFoundError:
        return f"its file {name} is missing"
    except OSError as e:
        return f"its file {name} cannot be read ({e.strerror})"
    if actual != crc:
        return (
            f"its file {name} does not match the checksum recorded when it was saved "
            "(its content is corrupt)"
        )
    return None


def read_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` of a checkpoint: every key's shape and dtype, no tensor data. Read
    without running code: anything but DCP's metadata classes is a CheckpointError."""
    try:
        return read_metadata_file(path / ".metadata")
    except MetadataRefused as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def check_model_matches(
    model_state: dict[str, Any], metadata: Metadata, path: Path, all_keys: set[str]
) -> None:
    """A one-line ConfigError naming the first parameter whose name or shape differs between the
    model and the checkpoint. ``all_keys``: every FQN of the whole model (pipeline ranks hold
    only some of them)."""
    saved = {
        key.removeprefix("model."): md.size
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    for fqn, tensor in model_state.items():
        if fqn not in saved:
            raise CheckpointError(f"checkpoint {path} does not fit the model: it has no {fqn}")
        if tuple(saved[fqn]) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit the model: {fqn} has shape "
                f"{tuple(saved[fqn])} in the checkpoint but {tuple(tensor.shape)} in the model"
            )
    if extra := sorted(set(saved) - all_keys):
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: the model has no {extra[0]} "
            f"(the checkpoint holds {len(extra)} parameter(s) the model lacks)"
        )


def write_complete(tmp: Path, final: Path, *, step: int, names: list[str]) -> None:
    """Mark a fully written checkpoint complete (marker last, synced, holding the checksums its
    ranks recorded and that of ``.metadata``) and give it its name."""
    sidecars = sorted(tmp.glob(f"*{CRC32_SUFFIX}"))
    crcs: dict[str, int] = {}
    for sidecar in sidecars:
        crcs.update(json.loads(sidecar.read_text()))
    record: dict[str, Any] = {"step": step, "states": names, "time": time.time()}
    if sidecars:  # written by ChecksumWriter (by plain DCP: no checksums to record)
        record["crc32"] = {".metadata": file_crc32(tmp / ".metadata"), **crcs}
    marker = tmp / COMPLETE
    marker.write_text(json.dumps(record))
    _fsync(marker)
    for sidecar in sidecars:
        sidecar.unlink()
    tmp.rename(final)
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
