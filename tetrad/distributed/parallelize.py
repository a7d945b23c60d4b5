"""The fixed order every model family's parallelize function follows: float8 → TP/SP →
activation checkpointing → compile → FSDP/HSDP/DDP (each step wraps what the previous one
produced). A family supplies only what depends on its module structure: its tensor-parallel
plan (in the styles picked here, float8-aware or not), the modules float8 must skip, and its
container of blocks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from typing import NamedTuple

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
)

from tetrad.components.float8 import apply_float8
from tetrad.config import Config, ConfigError
from tetrad.config.job_config import Float8Config
from tetrad.distributed.activation_checkpoint import apply_activation_checkpointing
from tetrad.distributed.compile import apply_compile
from tetrad.distributed.data_parallel import apply_ddp, apply_fsdp, mixed_precision_policy
from tetrad.distributed.parallel_dims import ParallelDims


class TensorParallelStyles(NamedTuple):
    """The styles a tensor-parallel plan uses for the (possibly converted) block linears and
    the modules whose input they all-gather; embeddings and the output layer keep torch's."""

    colwise: type[ColwiseParallel]
    rowwise: type[RowwiseParallel]
    prepare_input: type[PrepareModuleInput]


def _tensor_parallel_styles(config: Float8Config, blocks: nn.Module) -> TensorParallelStyles:
    """With float8 tensorwise, torchao's styles: activations are cast to float8 before the
    all-gather (half the bytes of bf16) and gradients in backward, which needs every linear of
    the (converted) ``blocks`` in float8. Rowwise keeps torch's styles (high-precision
    all-gathers: torchao's TP styles scale per tensor)."""
    if not (config.enable and config.recipe == "tensorwise"):
        return TensorParallelStyles(ColwiseParallel, RowwiseParallel, PrepareModuleInput)
    if kept := next((fqn for fqn, m in blocks.named_modules() if type(m) is nn.Linear), None):
        raise ConfigError(
            f"float8 tensorwise under tensor parallel needs every block linear in float8, but "
            f"{kept}'s dims are not multiples of 16: use --float8.recipe rowwise"
        )
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    return TensorParallelStyles(
        Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    )


def apply_parallelisms(
    model: nn.Module,
    blocks: nn.Module,
    parallel_dims: ParallelDims,
    config: Config,
    *,
    tensor_parallel: Callable[[DeviceMesh, TensorParallelStyles], None],
    float8_skip_fqns: Collection[str],
) -> None:
    """Apply every configured parallelism to ``model`` (on meta) in place. ``blocks`` is its
    ModuleDict or ModuleList of transformer blocks (the unit of checkpointing, compile and
    FSDP); ``tensor_parallel(tp_mesh, styles)`` applies the family's plan when tp > 1, with
    ``styles`` for the block linears and their inputs."""
    meshes, p = parallel_dims.meshes, config.parallelism
    tp_enabled = parallel_dims.tp > 1
    apply_float8(model, config.float8, skip_fqns=float8_skip_fqns)
    if tp_enabled:
        tensor_parallel(meshes["tp"], _tensor_parallel_styles(config.float8, blocks))
        if p.enable_async_tp:
            _enable_async_tp(meshes["tp"])
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


def _enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let Inductor split TP's all-gather → matmul and matmul → reduce-scatter into chunks that
    overlap communication with compute; its fused kernels exchange data through symmetric
    memory, which the TP group must enable. Validation ensured compile, tp > 1 and CUDA."""
    from torch._inductor import config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    inductor_config._micro_pipeline_tp = True
    # Deprecated in torch 2.13, yet without it the pass silently fuses nothing: its check
    # reads what only this call registers (pytorch/pytorch#193027).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
