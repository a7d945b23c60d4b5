"""The fixed order every model family's parallelize function follows: float8 → TP/SP →
activation checkpointing → compile → FSDP/HSDP/DDP (each step wraps what the previous one
produced). A family supplies only what depends on its module structure: its tensor-parallel
plan, the modules float8 must skip, and its container of blocks."""

from __future__ import annotations

from collections.abc import Callable, Collection

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from tetrad.components.float8 import apply_float8
from tetrad.config import Config, ConfigError
from tetrad.distributed.activation_checkpoint import apply_activation_checkpointing
from tetrad.distributed.compile import apply_compile
from tetrad.distributed.data_parallel import apply_ddp, apply_fsdp, mixed_precision_policy
from tetrad.distributed.parallel_dims import ParallelDims


def apply_parallelisms(
    model: nn.Module,
    blocks: nn.Module,
    parallel_dims: ParallelDims,
    config: Config,
    *,
    tensor_parallel: Callable[[DeviceMesh], None],
    float8_skip_fqns: Collection[str],
) -> None:
    """Apply every configured parallelism to ``model`` (on meta) in place. ``blocks`` is its
    ModuleDict or ModuleList of transformer blocks (the unit of checkpointing, compile and
    FSDP); ``tensor_parallel(tp_mesh)`` applies the family's plan when tp > 1."""
    meshes, p = parallel_dims.meshes, config.parallelism
    tp_enabled = parallel_dims.tp > 1
    if config.float8.enable and tp_enabled:
        raise ConfigError("--float8.enable with --parallelism.tp > 1 is not supported yet")
    apply_float8(model, config.float8, skip_fqns=float8_skip_fqns)
    if tp_enabled:
        tensor_parallel(meshes["tp"])
    apply_activation_checkpointing(blocks, config.activation_checkpoint)
    # Tensor parallel's DTensor backward breaks across per-block graphs: compile it whole.
    apply_compile(model, blocks, config.compile, whole_model=tp_enabled)

    mp_policy = mixed_precision_policy(
        config.training.mixed_precision_param,
        config.training.mixed_precision_reduce,
        meshes["world"].device_type,
    )
    block_list = list(blocks.children())  # after AC/compile: the wrapped blocks
    if parallel_dims.fsdp_enabled:
        apply_fsdp(
            model,
            block_list,
            meshes["fsdp"],
            mp_policy=mp_policy,
            reshard_after_forward=p.fsdp_reshard_after_forward,
            cpu_offload=config.training.enable_cpu_offload,
        )
    elif parallel_dims.dp_replicate > 1:
        apply_ddp(model, block_list, meshes["dp_replicate"], mp_policy=mp_policy)
