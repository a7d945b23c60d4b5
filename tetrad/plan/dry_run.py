"""``tetrad train --dry-run --world-size N``: everything a run builds before it allocates
memory or reads data — the config's checks, the mesh, the model on meta, the pipeline split
and the parallelized model — for chosen ranks of an N-rank world, in one CPU process. Reports
what each of those ranks would hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tetrad.config import Config, ConfigError, validate_config
from tetrad.data import build_tokenizer
from tetrad.distributed.context_parallel import ContextParallel
from tetrad.distributed.parallel_dims import MESH_DIM_NAMES, ParallelDims
from tetrad.distributed.utils import local_numel
from tetrad.models.build import MetaModel, attention_for, build_meta_model
from tetrad.models.registry import get_model_spec
from tetrad.models.spec import DecoderModel
from tetrad.plan.fake_world import fake_world

# What the wrappers (activation checkpointing, compile) insert into parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass(frozen=True)
class WeightSummary:
    name: str
    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    placements: str
    """e.g. ``dp_shard_cp:Shard(dim=0) tp:Shard(dim=0)``; ``replicated`` for a plain tensor."""


@dataclass(frozen=True)
class RankSummary:
    rank: int
    coordinates: dict[str, int]
    """This rank's index along each mesh dimension."""
    stages: list[int]
    """Its pipeline stages ([0] without pipeline parallel)."""
    layers: list[str]
    """The blocks it holds."""
    local_params: int
    local_param_bytes: int
    total_params: int
    optimizer_state_bytes: int
    weights: list[WeightSummary]


def clean_name(fqn: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


def optimizer_state_bytes(config: Config, parts: Sequence[nn.Module]) -> int:
    """Adam's two moments for each trainable parameter's local shard, in --optimizer.state_dtype
    (float32 moments take the parameter's own dtype, as torch's AdamW allocates them)."""
    total = 0
    for p in (p for part in parts for p in part.parameters() if p.requires_grad):
        size = 2 if config.optimizer.state_dtype == "bfloat16" else p.dtype.itemsize
        total += 2 * local_numel(p) * size
    return total


def _weights(parts: Sequence[DecoderModel]) -> list[WeightSummary]:
    """A few representative weights: those outside the blocks (embeddings, final norm, output),
    the 2-D ones of this rank's first block and its first routed experts' (an MoE's)."""
    part = parts[0]
    blocks = part.blocks()
    prefix = next(n for n, m in part.named_modules() if m is blocks)
    first = next(iter(blocks.named_children()))[0]
    params = [(clean_name(n), p) for part in parts for n, p in part.named_parameters()]
    outside = [(n, p) for n, p in params if not n.startswith(f"{prefix}.")]
    block = [(n, p) for n, p in params if n.startswith(f"{prefix}.{first}.") and p.ndim == 2]
    experts = [(n, p) for n, p in params if ".experts." in n]
    chosen = outside[:1] + block[:2] + experts[:1] + outside[1:][-2:]
    return [_weight(n, p) for n, p in chosen]


def _weight(name: str, p: torch.Tensor) -> WeightSummary:
    if not isinstance(p, DTensor):
        return WeightSummary(name, tuple(p.shape), tuple(p.shape), "replicated")
    names = p.device_mesh.mesh_dim_names or tuple(str(i) for i in range(p.device_mesh.ndim))
    placements = " ".join(f"{d}:{pl}" for d, pl in zip(names, p.placements, strict=True))
    return WeightSummary(name, tuple(p.shape), tuple(p.to_local().shape), placements)


def build_rank(
    config: Config, world_size: int, *, vocab_size: int, n_layers: int | None = None
) -> tuple[ParallelDims, MetaModel]:
    """The mesh and the meta model parts of the rank the (fake) process group says this is,
    as a GPU run builds them (its mixed precision and attention)."""
    dims = ParallelDims.from_config(config.parallelism, world_size)
    dims.target_device_type = "cuda"
    dims.grad_accumulation_steps(config.training)
    cp = ContextParallel(dims.meshes["cp"], config.training.seq_len) if dims.cp > 1 else None
    attention = attention_for(config, cp, "cuda")
    built = build_meta_model(
        config, dims, vocab_size=vocab_size, attention=attention, n_layers=n_layers
    )
    return dims, built


def summarize_rank(config: Config, world_size: int, rank: int, *, vocab_size: int) -> RankSummary:
    with fake_world(rank, world_size):
        dims, built = build_rank(config, world_size, vocab_size=vocab_size)
        coordinates = dict(
            zip(MESH_DIM_NAMES, dims.meshes["world"].get_coordinate() or [], strict=True)
        )
        parts = built.parts
        return RankSummary(
            rank=rank,
            coordinates=coordinates,
            stages=built.plan.local_stages if built.plan else [0],
            layers=[clean_name(n) for part in parts for n, _ in part.blocks().named_children()],
            local_params=sum(local_numel(p) for part in parts for p in part.parameters()),
            local_param_bytes=sum(
                local_numel(p) * p.dtype.itemsize for part in parts for p in part.parameters()
            ),
            total_params=built.total_params,
            optimizer_state_bytes=optimizer_state_bytes(config, parts),
            weights=_weights(parts),
        )


def tokenizer_vocab_size(config: Config) -> int:
    """The vocabulary the model's embedding takes when its preset leaves it to the tokenizer."""
    return build_tokenizer(get_model_spec(config.model.name).tokenizer_for(config)).vocab_size


def ranks_to_check(config: Config, world_size: int) -> list[int]:
    """Rank 0, the first rank of each pipeline stage group, and the last rank."""
    pp = config.parallelism.pp
    step = world_size // pp if pp > 0 and world_size % pp == 0 else world_size
    return sorted({*range(0, world_size, step), world_size - 1})


def dry_run(
    config: Config, world_size: int, ranks: Sequence[int] | None = None
) -> list[RankSummary]:
    """Build every chosen rank (default ``ranks_to_check``) of a ``world_size``-rank run."""
    validate_config(config)
    ParallelDims.from_config(config.parallelism, world_size)  # the arithmetic, before any rank
    ranks = list(ranks) if ranks is not None else ranks_to_check(config, world_size)
    if bad := [r for r in ranks if not 0 <= r < world_size]:
        raise ConfigError(f"--dry-run-ranks {bad[0]} is not a rank of world size {world_size}")
    vocab_size = tokenizer_vocab_size(config)
    return [summarize_rank(config, world_size, r, vocab_size=vocab_size) for r in ranks]


def format_summaries(config: Config, world_size: int, summaries: Sequence[RankSummary]) -> str:
    p = config.parallelism
    dims = ParallelDims.from_config(p, world_size)
    mesh = " × ".join(f"{n} {getattr(dims, n)}" for n in MESH_DIM_NAMES)
    if dims.ep_enabled:
        mesh += f" (experts: ep {dims.ep} of dp_shard × cp)"
    lines = [
        f"dry run of {config.model.name}/{config.model.flavor} on {world_size} ranks: {mesh}; "
        f"{summaries[0].total_params:,} parameters; seq_len {config.training.seq_len}, "
        f"local batch {config.training.local_batch_size}, "
        f"{dims.grad_accumulation_steps(config.training)} micro-batch(es) per step"
        + (f", pipeline {p.pp_schedule}" if p.pp > 1 else ""),
    ]
    for s in summaries:
        coords = " ".join(f"{n}={i}" for n, i in s.coordinates.items())
        layers = f"{s.layers[0]}..{s.layers[-1]}" if len(s.layers) > 1 else ",".join(s.layers)
        lines.append(
            f"rank {s.rank} ({coords}): stage(s) {s.stages}, {len(s.layers)} layer(s) [{layers}], "
            f"{s.local_params:,} parameters here of {s.total_params:,} "
            f"({s.local_param_bytes / 2**30:.2f} GiB), optimizer state "
            f"{s.optimizer_state_bytes / 2**30:.2f} GiB"
        )
        for w in s.weights:
            lines.append(
                f"    {w.name}: {list(w.shape)} → local {list(w.local_shape)}  {w.placements}"
            )
    lines.append("dry run passed: nothing was allocated, read or written")
    return "\n".join(lines)
