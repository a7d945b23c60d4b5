"""The fixed order in which parallelisms wrap a (meta, possibly float8-converted) model:
TP/SP → EP → activation checkpointing → compile → FSDP/HSDP/DDP, each step wrapping what the
previous one produced. A family supplies only its module names for tensor parallel's roles,
its container of blocks and its mixture-of-experts layers."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from tetrad.config import Config
from tetrad.config.job_config import Float8Config
from tetrad.distributed.activation_checkpoint import apply_activation_checkpointing
from tetrad.distributed.compile import apply_compile
from tetrad.distributed.data_parallel import apply_ddp, apply_fsdp, mixed_precision_policy
from tetrad.distributed.expert_parallel import apply_expert_parallel
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.tensor_parallel import (
    TORCH_STYLES,
    DecoderRoles,
    TensorParallelStyles,
    apply_tensor_parallel,
)
from tetrad.errors import ConfigError


def _tensor_parallel_styles(config: Float8Config, blocks: nn.Module) -> TensorParallelStyles:
    """With float8 tensorwise, torchao's styles: activations are cast to float8 before the
    all-gather (half the bytes of bf16) and gradients in backward, which needs every linear of
    the (converted) ``blocks`` in float8. Rowwise keeps torch's styles (high-precision
    all-gathers: torchao's TP styles scale per tensor)."""
    if not (config.enable and config.recipe == "tensorwise"):
        return TORCH_STYLES
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
    tp_roles: DecoderRoles | None,
    moe_layers: Sequence[nn.Module] = (),
) -> None:
    """Apply every configured parallelism to ``model`` (on meta) in place. ``blocks`` is its
    ModuleDict or ModuleList of transformer blocks (the unit of checkpointing, compile and
    FSDP); ``tp_roles`` name its modules for tensor parallel (None: a model tensor parallel
    cannot split, which the family's ``check_parallelism`` rejects before this);
    ``moe_layers`` are its mixture-of-experts feed-forwards, each with its routed experts as
    ``.experts`` (see ``expert_parallel``)."""
    meshes, p = parallel_dims.meshes, config.parallelism
    tp_enabled = parallel_dims.tp > 1
    if tp_enabled:
        assert tp_roles is not None, "check_parallelism admits tp > 1 only with roles"
        apply_tensor_parallel(
            model,
            blocks,
            tp_roles,
            meshes["tp"],
            _tensor_parallel_styles(config.float8, blocks),
            sequence_parallel=p.enable_sequence_parallel,
            loss_parallel=p.enable_loss_parallel,
            whole_mlps=moe_layers,
        )
        if p.enable_async_tp:
            _enable_async_tp(meshes["tp"])
    experts = [layer.get_submodule("experts") for layer in moe_layers]
    if parallel_dims.ep_enabled:
        for module in experts:
            apply_expert_parallel(module, meshes["ep"])
    apply_activation_checkpointing(blocks, config.activation_checkpoint)
    # Tensor parallel's DTensor backward breaks across per-block graphs: compile it whole.
    apply_compile(model, blocks, config.compile, whole_model=tp_enabled)

    mp_policy = mixed_precision_policy(
        config.training.mixed_precision_param,
        config.training.mixed_precision_reduce,
        parallel_dims.target_device_type or meshes["world"].device_type,
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
            experts=(experts, meshes["efsdp"]) if parallel_dims.ep_enabled else None,
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
