"""Hugging Face safetensors weights in and out of a (possibly sharded) model.

Loading reads one tensor at a time and only the keys this rank holds, then keeps the rank's own
slice of each (``distribute_tensor`` with ``src_data_rank=None`` slices locally, no
communication). A tensor stacked from several HF keys along dim 0 (routed experts, one key per
expert) reads only the keys of the rows in the rank's shard. Saving gathers each tensor once per
group of ranks that hold the same parameters (a pipeline stage), and that group's first rank
writes them, so no rank ever holds the whole model; rank 0 then names the files as
``transformers`` expects and writes the index, ``config.json`` and the run's tokenizer
(tokenizer.json, tokenizer_config.json with the chat template and special tokens), so
``AutoTokenizer`` and ``apply_chat_template`` work on it.
Everything is written under ``<folder>.tmp`` and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from tetrad.data.tokenizer import Tokenizer, save_tokenizer
from tetrad.distributed.utils import all_gather_objects, barrier, copy_full_, process_rank
from tetrad.errors import CheckpointError
from tetrad.models.lora import adapted_linears, is_adapter, merged_weight
from tetrad.models.spec import StateDictAdapter
from tetrad.tools.progress import progress_bar

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hf_weight_map(folder: Path) -> dict[str, Path]:
    """HF key → the safetensors file that holds it, from the index or the single file."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as f:
            return dict.fromkeys(f.keys(), folder / SINGLE_FILE)
    if not folder.is_dir():
        raise CheckpointError(f"Hugging Face checkpoint folder {folder} does not exist")
    raise CheckpointError(
        f"{folder} holds no {SINGLE_FILE} or {INDEX_FILE}; is it a Hugging Face model folder?"
    )


def _model_keys(local: set[str]) -> set[str]:
    """The HF keys the whole model needs: under pipeline parallel each rank holds only its
    stage's, so the union over ranks (a collective when distributed)."""
    return set().union(*all_gather_objects(local))


def _hf_tensors(
    model: nn.Module, adapter: StateDictAdapter
) -> dict[str, tuple[list[str], torch.Tensor]]:
    """tetrad FQN → (HF keys, the model's tensor) for every tensor the HF format stores: not a
    tied copy, not a LoRA adapter (an export merges the adapters into the base weights)."""
    return {
        fqn: (keys, tensor)
        for fqn, tensor in model.state_dict().items()
        if not is_adapter(fqn) and (keys := adapter.hf_keys(fqn))
    }


def _check_keys(
    folder: Path, weight_map: dict[str, Path], needed: set[str], tied: set[str]
) -> None:
    """Every checkpoint tensor must have a place in the model and every model tensor must be in
    the checkpoint, so a model smaller than its weights does not silently drop some. A tied
    model's output copy (some checkpoints store it) and rotary tables that older checkpoints
    saved (recomputed, as transformers does) are ignored."""
    extra = sorted(k for k in set(weight_map) - needed - tied if not k.endswith(".inv_freq"))
    missing = sorted(needed - set(weight_map))
    if not extra and not missing:
        return
    problems = []
    if extra:
        problems.append(
            f"{len(extra)} checkpoint tensors have no place in the model (e.g. {extra[0]})"
        )
    if missing:
        problems.append(f"{len(missing)} model tensors are missing from it (e.g. {missing[0]})")
    raise CheckpointError(
        f"Hugging Face checkpoint {folder} does not fit the model: {'; '.join(problems)}; "
        "check --model.flavor, or --model.hf_overrides (a resized HF model needs "
        "--model.hf_init random), or that the folder holds this model's weights"
    )


@torch.no_grad()
def load_hf_weights(model: nn.Module, folder: Path, adapter: StateDictAdapter) -> None:
    """Copy HF weights into ``model``'s parameters (plain or DTensor), in place; a collective
    when distributed. A one-line CheckpointError when the checkpoint's tensors and the model's
    differ in name or shape."""
    folder = Path(folder)
    weight_map = hf_weight_map(folder)
    targets = _hf_tensors(model, adapter)
    needed = _model_keys({key for keys, _ in targets.values() for key in keys})
    # Adapters of tied models name the output's HF key(s); the protocol does not require it.
    _check_keys(folder, weight_map, needed, adapter.tied_keys)
    files = {}  # safetensors files open lazily: only the tensors read are loaded
    loading = progress_bar(
        f"loading {folder.name}", targets.items(), total=len(targets), unit="tensor"
    )
    for fqn, (keys, tensor) in loading:
        box = _local_box(tensor) if len(keys) > 1 else None
        rows = slice(box[1][0], box[1][0] + box[0][0]) if box else slice(None)
        if not keys[rows]:
            continue  # an uneven shard with no rows here
        read = []
        for key in keys[rows]:
            path = weight_map[key]
            if path not in files:
                files[path] = safe_open(path, framework="pt")
            read.append(files[path].get_tensor(key))
        value = adapter.from_hf(fqn, read)
        want = [len(keys[rows]), *tensor.shape[1:]] if len(keys) > 1 else list(tensor.shape)
        if list(value.shape) != want:
            named = f"'{keys[0]}' has" if len(keys) == 1 else f"'{keys[rows][0]}'.. stack to"
            raise CheckpointError(
                f"Hugging Face checkpoint {folder}: {named} shape {list(value.shape)}, "
                f"the model expects {want} for '{fqn}'"
            )
        if box is None:
            copy_full_(tensor, value)
            continue
        assert isinstance(tensor, DTensor)  # _local_box: only a sharded tensor has a box
        for dim in range(1, value.dim()):
            value = value.narrow(dim, box[1][dim], box[0][dim])
        tensor.to_local().copy_(value)
    logger.info("loaded %d tensors from Hugging Face checkpoint %s", len(targets), folder)


def _local_box(tensor: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """(shape, offset) of the block of the full tensor this rank's shard of a DTensor is, when
    it is one block (every placement a plain Shard or Replicate); None = read the whole tensor."""
    if not isinstance(tensor, DTensor) or not all(
        type(p) is Shard or isinstance(p, Replicate) for p in tensor.placements
    ):
        return None
    shape, offset = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements
    )
    return list(shape), list(offset)


def _writer_group(keys: list[str]) -> tuple[bool, int]:
    """Whether this rank writes its tensors (the lowest rank among those holding exactly these
    keys), and its index among the writers."""
    firsts: dict[tuple[str, ...], int] = {}
    for rank, held in enumerate(all_gather_objects(tuple(keys))):
        firsts.setdefault(held, rank)
    writers = sorted(firsts.values())
    rank = process_rank()
    return rank in writers, writers.index(rank) if rank in writers else -1


@torch.no_grad()
def save_hf_weights(
    model: nn.Module,
    folder: Path,
    adapter: StateDictAdapter,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size_mb: float = 5000,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
) -> None:
    """Write ``model``'s weights as a Hugging Face folder, LoRA adapters merged into the
    weights they adapt, with ``tokenizer`` and ``chat_template`` (see ``save_tokenizer``) when
    given; a collective when distributed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if folder.exists():
        raise CheckpointError(f"{folder} already exists; remove it or choose another export folder")
    hf_config = adapter.hf_config()  # before writing: a model the format cannot hold fails here
    if process_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state = _hf_tensors(model, adapter)
    lora_linears = adapted_linears(model)
    dtype = dtype or next(iter(state.values()))[1].dtype
    is_writer, writer_index = _writer_group(sorted(state))
    max_bytes = int(max_shard_size_mb * 2**20)
    files: list[tuple[list[str], int]] = []  # this writer's files: HF keys, tensor bytes
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            save_file(shard, tmp / f"part-{writer_index}-{len(files)}.safetensors")
            files.append((list(shard), shard_bytes))
            shard, shard_bytes = {}, 0

    barrier()  # the temporary folder exists
    exporting = progress_bar(
        f"exporting {folder.name}", state.items(), total=len(state), unit="tensor"
    )
    for fqn, (keys, tensor) in exporting:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        # W + alpha/r·B·A where adapted; a gathered copy may take the sum in place.
        full = merged_weight(lora_linears, fqn, full, in_place=full is not tensor)
        if not is_writer:
            continue
        pieces = adapter.to_hf(fqn, full.detach().to("cpu", dtype))
        for key, piece in zip(keys, pieces, strict=True):
            size = piece.numel() * piece.element_size()
            if shard and shard_bytes + size > max_bytes:
                flush()
            shard[key] = piece.contiguous()
            shard_bytes += size
    flush()
    written = all_gather_objects((writer_index, files) if is_writer else None)
    files_by_writer = [f for _, f in sorted(w for w in written if w is not None)]
    if process_rank() == 0:
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, chat_template)
        _finish(tmp, folder, files_by_writer, hf_config, dtype)
    barrier()
    logger.info("exported Hugging Face checkpoint %s", folder)


def _finish(
    tmp: Path,
    folder: Path,
    files_by_writer: list[list[tuple[list[str], int]]],
    hf_config: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    """Rename the writers' parts to transformers' names, write the index and config.json, and
    move the folder into place."""
    parts = [
        (tmp / f"part-{w}-{i}.safetensors", keys, size)
        for w, files in enumerate(files_by_writer)
        for i, (keys, size) in enumerate(files)
    ]
    if len(parts) == 1:
        parts[0][0].rename(tmp / SINGLE_FILE)
    else:
        weight_map: dict[str, str] = {}
        total = 0
        for n, (path, keys, size) in enumerate(parts, start=1):
            name = f"model-{n:05d}-of-{len(parts):05d}.safetensors"
            total += size
            path.rename(tmp / name)
            weight_map |= dict.fromkeys(keys, name)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = hf_config | {"torch_dtype": str(dtype).removeprefix("torch.")}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.rename(folder)
