"""DCP checkpoints of everything a run needs to continue exactly: model, optimizer, LR schedule,
data position, step, tokens seen and RNG, under ``<dump_folder>/checkpoint/step-N``.

Each rank writes its own shards (``torch.distributed.checkpoint``), so a checkpoint loads into
any parallel layout (DCP reshards on load). Crash safety: a checkpoint is written as
``step-N.tmp``; once every rank's shards and DCP's ``.metadata`` are on disk, rank 0 writes a
``COMPLETE`` marker into it and renames it to ``step-N``. Only a ``step-N`` folder with the
marker, a readable ``.metadata`` and every data file it names is ever loaded; anything else is
reported and skipped. Async saves (``dcp.async_save``) write in a background thread over a
process group of their own, so the collectives of training and of the save never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from tetrad.components.hf_checkpoint import save_hf_weights
from tetrad.config import ConfigError
from tetrad.config.job_config import CheckpointConfig
from tetrad.models.spec import StateDictAdapter

logger = logging.getLogger(__name__)

STATES = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
"""The named states of a checkpoint, in the order they are built; --checkpoint.exclude_from_loading
takes these names."""

COMPLETE = "COMPLETE"
"""Marker file, written last into a finished checkpoint."""

_STEP_DIR = re.compile(r"^step-(\d+)(\.tmp)?$")
_DP_RANK_KEY = re.compile(r"^dataloader\.dp_rank_(\d+)\.")
# Optimizer state and hyperparameters keyed by parameter FQN, not by param-group index: pipeline
# ranks hold different parameters in their "group 0", and DCP would keep only one rank's list.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelState(Stateful):
    """The model's parameters under FQNs that do not depend on the parallel layout (DTensors
    when sharded). ``dtype`` casts floating tensors on save (an export in bfloat16)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        self.model, self.dtype = model, dtype

    def state_dict(self) -> dict[str, Any]:
        state = get_model_state_dict(self.model)
        if self.dtype is None:
            return state
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """The optimizer's moments and hyperparameters, keyed by the parameters' FQNs."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIONS)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=_OPTIONS)


class DataState(Stateful):
    """The dataloader's position; a state it cannot take (another batch size) is a ConfigError."""

    def __init__(self, dataloader: Stateful) -> None:
        self.dataloader = dataloader

    def state_dict(self) -> dict[str, Any]:
        return self.dataloader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self.dataloader.load_state_dict(state_dict)
        except ValueError as e:
            raise ConfigError(
                f"{e} (or pass --checkpoint.exclude_from_loading=dataloader to start the data "
                "from the beginning)"
            ) from None


def merged_view(parts: list[nn.Module]) -> nn.Module:
    """A module whose children are the parts' own (shared, not copied) submodules, merged by
    name: containers present in several parts (a ``layers`` ModuleDict) merge their disjoint
    entries. Parameters stay the parts' objects, so the optimizer's state maps onto it."""
    if len(parts) == 1:
        return parts[0]
    view, merged = nn.Module(), set()
    for part in parts:
        if next(part.parameters(recurse=False), None) is not None:
            raise ValueError("model parts with parameters of their own cannot be merged")
        for name, child in part.named_children():
            existing = view._modules.get(name)
            if existing is None:
                view.add_module(name, child)
            elif existing is not child:
                if not isinstance(existing, nn.ModuleDict) or not isinstance(child, nn.ModuleDict):
                    raise ValueError(f"model parts both hold a different '{name}'")
                if name not in merged:  # a new container: the parts' own stay untouched
                    existing = nn.ModuleDict(existing)
                    view.add_module(name, existing)
                    merged.add(name)
                existing.update(child)
    return view


class TrainState(Stateful):
    """The step counter, the tokens trained on so far and the RNG, so a resumed run draws the
    same random numbers. Every rank seeds its generators alike, so one copy serves all."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])
        torch.set_rng_state(state_dict["rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda_rng"])


def parse_exclude(value: str) -> set[str]:
    """``--checkpoint.exclude_from_loading``: comma-separated state names."""
    names = {name.strip() for name in value.split(",") if name.strip()}
    if unknown := sorted(names - set(STATES)):
        raise ConfigError(
            f"--checkpoint.exclude_from_loading: unknown state {unknown[0]!r}; "
            f"the states are {', '.join(STATES)}"
        )
    return names


def checkpoint_problem(path: Path, *, need_marker: bool = True) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint; None if it is one."""
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
        metadata = read_metadata(path)
    except Exception as e:  # a truncated or foreign file: report, never load
        return f"its .metadata cannot be read ({type(e).__name__})"
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
    return None


def read_metadata(path: Path) -> Metadata:
    return dcp.FileSystemReader(str(path)).read_metadata()


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
            raise ConfigError(f"checkpoint {path} does not fit the model: it has no {fqn}")
        if tuple(saved[fqn]) != tuple(tensor.shape):
            raise ConfigError(
                f"checkpoint {path} does not fit the model: {fqn} has shape "
                f"{tuple(saved[fqn])} in the checkpoint but {tuple(tensor.shape)} in the model"
            )
    if extra := sorted(set(saved) - all_keys):
        raise ConfigError(
            f"checkpoint {path} does not fit the model: the model has no {extra[0]} "
            f"(the checkpoint holds {len(extra)} parameter(s) the model lacks)"
        )


class CheckpointManager:
    """Saves and loads the run's named states; see the module docstring for the folder rules."""

    def __init__(
        self,
        config: CheckpointConfig,
        folder: Path,
        *,
        model_parts: list[nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Stateful,
        dataloader: Stateful,
        train_state: TrainState,
        total_steps: int,
        hf_adapter: StateDictAdapter | None = None,
    ) -> None:
        self.config = config
        self.hf_adapter = hf_adapter
        if config.last_save_in_hf and hf_adapter is None:
            raise ConfigError(
                "this model family has no Hugging Face state-dict adapter: "
                "--checkpoint.last_save_in_hf is not available for it"
            )
        self.folder = folder
        self.total_steps = total_steps
        self.train_state = train_state
        self.exclude = parse_exclude(config.exclude_from_loading)
        self.enabled = config.enable or config.create_seed_checkpoint
        self.model = merged_view(model_parts)
        self.states: dict[str, Stateful] = {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, optimizer),
            "lr_scheduler": lr_scheduler,
            "dataloader": DataState(dataloader),
            "train_state": train_state,
        }
        self.dp_world_size = int(dataloader.state_dict()["dp_world_size"])
        self.rank = dist.get_rank()
        if config.create_seed_checkpoint and dist.get_world_size() != 1:
            raise ConfigError(
                "--checkpoint.create_seed_checkpoint initialises the model on one process: "
                "run it with --nproc=1 and no parallelism"
            )
        # A group of its own for async saves: its collectives run in a background thread while
        # training's run on the others (on the default group, gloo would mix the two up).
        async_mode = config.async_mode == "async"
        self.group = dist.new_group(backend="gloo") if async_mode and self.enabled else None
        # The async save in flight: its future, and an event set once rank 0 has made it visible.
        self.pending: tuple[Future, threading.Event] | None = None

    # ---- finding and loading ----

    def complete_steps(self, *, report: bool = False) -> list[int]:
        """Steps of the complete checkpoints in the folder, oldest first; with ``report``, log
        every folder that is skipped and why."""
        if not self.folder.is_dir():
            return []
        steps = []
        for path in sorted(self.folder.iterdir()):
            if not (m := _STEP_DIR.match(path.name)):
                continue
            if problem := checkpoint_problem(path):
                if report and self.rank == 0:
                    logger.warning("skipping checkpoint %s: %s", path, problem)
            else:
                steps.append(int(m[1]))
        return sorted(steps)

    def _source(self) -> Path | None:
        """The checkpoint this run starts from: the chosen or latest one in its own folder, else
        --checkpoint.initial_load_path; None: start from scratch."""
        c = self.config
        if c.enable and c.load_step >= 0:
            path = self.folder / f"step-{c.load_step}"
            if problem := checkpoint_problem(path):
                raise ConfigError(f"--checkpoint.load_step {c.load_step}: {path}: {problem}")
            return path
        if c.enable and (steps := self.complete_steps(report=True)):
            return self.folder / f"step-{steps[-1]}"
        if c.initial_load_path and not c.initial_load_in_hf:  # HF weights: the trainer's
            path = Path(c.initial_load_path)
            if problem := checkpoint_problem(path, need_marker=False):
                raise ConfigError(f"--checkpoint.initial_load_path {path}: {problem}")
            return path
        return None

    def load(self) -> int | None:
        """Restore the run's states from its checkpoint (see ``_source``) after checking that it
        fits; refuse a run that would overwrite checkpoints it does not resume from. Returns the
        loaded checkpoint's step (None: nothing loaded)."""
        if self.config.create_seed_checkpoint:
            self._check_overwrite(0)
            return None
        path = self._source()
        if path is None:
            self._check_overwrite(0)
            return None
        metadata = read_metadata(path)
        held = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
        names = [name for name in STATES if name in held and name not in self.exclude]
        if "model" in names:
            model_state = self.states["model"].state_dict()
            all_keys: list[set[str]] = [set()] * dist.get_world_size()
            dist.all_gather_object(all_keys, set(model_state))
            check_model_matches(model_state, metadata, path, set().union(*all_keys))
        if "dataloader" in names:
            self._check_dp_degree(metadata, path)
        start_step = _step_of(path) if "train_state" in names else 0
        self._check_overwrite(start_step or 0)
        begin = time.perf_counter()
        dcp.load({name: self.states[name] for name in names}, checkpoint_id=str(path))
        self._sync_lr()
        fresh = [name for name in STATES if name not in names]
        logger.info(
            "resumed from %s in %.1f s (step %d, %d tokens seen)%s",
            path, time.perf_counter() - begin, self.train_state.step, self.train_state.tokens_seen,
            f"; not loaded, starting fresh: {', '.join(fresh)}" if fresh else "",
        )  # fmt: skip
        return _step_of(path)

    def _sync_lr(self) -> None:
        """A loaded optimizer brings the learning rate it was saved with; the scheduler, loaded
        or fresh, decides the rate of the next step."""
        scheduler, optimizer = self.states["lr_scheduler"], self.states["optimizer"]
        assert isinstance(optimizer, OptimizerState)
        if hasattr(scheduler, "get_last_lr"):
            for group, lr in zip(
                optimizer.optimizer.param_groups, scheduler.get_last_lr(), strict=True
            ):
                group["lr"] = lr

    def _check_dp_degree(self, metadata: Metadata, path: Path) -> None:
        saved = {int(m[1]) for k in metadata.state_dict_metadata if (m := _DP_RANK_KEY.match(k))}
        if len(saved) != self.dp_world_size:
            raise ConfigError(
                f"checkpoint {path} holds the data position of {len(saved)} data-parallel "
                f"rank(s) but this run has {self.dp_world_size}; a position cannot be split "
                "differently without repeating or skipping data: resume with the same "
                "data-parallel degree, or pass --checkpoint.exclude_from_loading=dataloader "
                "to start the data from the beginning"
            )

    def _check_overwrite(self, start_step: int) -> None:
        """Refuse to start a run that would replace a complete checkpoint it did not start from
        (unless --checkpoint.overwrite)."""
        if not self.enabled or self.config.overwrite:
            return
        existing = set(self.complete_steps())
        if self.config.create_seed_checkpoint:
            planned = {0}
        else:
            planned = {s for s in range(start_step + 1, self.total_steps + 1) if self._due(s)}
        clashes = [self.folder / f"step-{s}" for s in sorted(existing & planned)]
        if self.config.last_save_in_hf and self.config.enable:
            clashes += [p for p in [self._hf_folder(self.total_steps)] if p.exists()]
        if clashes:
            raise ConfigError(
                f"{clashes[0]} exists and this run (starting after step {start_step}) would "
                "overwrite it; resume from it, pass --checkpoint.overwrite to replace it, or use "
                "another --job.dump_folder"
            )

    # ---- saving ----

    def _due(self, step: int) -> bool:
        return step % self.config.interval == 0 or step == self.total_steps

    def maybe_save(self, step: int) -> None:
        """Save at the interval and at the last step (model only there with
        --checkpoint.last_save_model_only)."""
        if not self.config.enable or not self._due(step):
            return
        last = step == self.total_steps
        self.save(step, model_only=last and self.config.last_save_model_only)
        if last and self.config.last_save_in_hf:
            self.export_hf(step)

    def _hf_folder(self, step: int) -> Path:
        return self.folder / f"step-{step}-hf"

    def export_hf(self, step: int) -> None:
        """The weights as a Hugging Face folder (collective: every rank takes part)."""
        assert self.hf_adapter is not None
        folder = self._hf_folder(step)
        if self.rank == 0 and folder.exists():  # only with --checkpoint.overwrite
            shutil.rmtree(folder)
        dist.barrier()
        begin = time.perf_counter()
        dtype = getattr(torch, self.config.export_dtype)
        save_hf_weights(self.model, folder, self.hf_adapter, dtype=dtype)
        logger.info("exported %s in %.2f s", folder, time.perf_counter() - begin)

    def save_seed(self) -> None:
        """The seed checkpoint: the freshly initialised model alone, as step-0."""
        self.save(0, model_only=True)
        self.wait()

    def save(self, step: int, *, model_only: bool = False) -> None:
        self.wait()  # one save in flight at a time
        tmp = self.folder / f"step-{step}.tmp"
        if self.rank == 0 and tmp.exists():  # left by a save that did not finish
            shutil.rmtree(tmp)
        dist.barrier()
        if model_only:
            dtype = getattr(torch, self.config.export_dtype)
            states: dict[str, Stateful] = {"model": ModelState(self.model, dtype)}
        else:
            states = self.states
        begin = time.perf_counter()
        if self.group is None:
            dcp.save(states, checkpoint_id=str(tmp))
            self._finalize(step, begin, time.perf_counter() - begin, sorted(states))
            return
        future = dcp.async_save(states, checkpoint_id=str(tmp), process_group=self.group)
        blocked = time.perf_counter() - begin
        finalized = threading.Event()
        if self.rank == 0:
            # Rank 0's save ends after every rank's shards and the metadata are written.
            def on_done(f: Future) -> None:
                try:
                    if f.exception() is None:
                        self._finalize(step, begin, blocked, sorted(states))
                finally:
                    finalized.set()

            future.add_done_callback(on_done)
        else:
            finalized.set()
        self.pending = (future, finalized)

    def _finalize(self, step: int, begin: float, blocked: float, names: list[str]) -> None:
        """Rank 0: marker last, then the rename that makes the checkpoint visible; then trim."""
        tmp, final = self.folder / f"step-{step}.tmp", self.folder / f"step-{step}"
        if self.rank == 0:
            if final.exists():  # only with --checkpoint.overwrite (checked at start-up)
                shutil.rmtree(final)
            write_complete(tmp, final, step=step, names=names)
            self._purge()
        logger.info(
            "saved %s: %.2f s, of which training was blocked %.2f s",
            final, time.perf_counter() - begin, blocked,
        )  # fmt: skip

    def _purge(self) -> None:
        """--checkpoint.keep_latest_k: delete complete checkpoints older than the newest k."""
        k = self.config.keep_latest_k
        if k <= 0:
            return
        for step in self.complete_steps()[:-k]:
            shutil.rmtree(self.folder / f"step-{step}")
            logger.info(
                "removed %s (--checkpoint.keep_latest_k %d)", self.folder / f"step-{step}", k
            )

    def wait(self) -> None:
        """Wait for the save in flight (async mode) to be written and made visible."""
        if self.pending is None:
            return
        (future, finalized), self.pending = self.pending, None
        future.result()
        finalized.wait()
        dist.barrier(group=self.group)


def write_complete(tmp: Path, final: Path, *, step: int, names: list[str]) -> None:
    """Mark a fully written checkpoint complete (marker last, synced) and give it its name."""
    marker = tmp / COMPLETE
    marker.write_text(json.dumps({"step": step, "states": names, "time": time.time()}))
    _fsync(marker)
    tmp.rename(final)
    _fsync(final.parent)


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m[1]) if m else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
