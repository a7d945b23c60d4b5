"""Where the Llama-3 module structure meets the mesh: float8 → TP/SP → activation checkpointing
→ compile → FSDP/HSDP/DDP, in that order (each step wraps what the previous one produced)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from tetrad.components.float8 import apply_float8
from tetrad.config import Config, ConfigError
from tetrad.distributed.activation_checkpoint import apply_activation_checkpointing
from tetrad.distributed.compile import apply_compile
from tetrad.distributed.data_parallel import apply_ddp, apply_fsdp, mixed_precision_policy
from tetrad.distributed.parallel_dims import ParallelDims


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool
) -> None:
    """Megatron-style TP: q/k/v/w1/w3 split by output columns, wo/w2 by input rows, so each block
    needs one reduction after attention and one after the FFN. With sequence parallel those
    reductions become reduce-scatters along the sequence, and norms/residuals run on 1/tp of
    the tokens; the following all-gather happens where a block's input enters attention/FFN."""
    residual = Shard(1) if sequence_parallel else Replicate()
    root_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "output": ColwiseParallel(
            input_layouts=residual,
            # Vocab-sharded logits stay sharded for loss_parallel; otherwise gather them.
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sequence_parallel:
        root_plan["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, root_plan)

    for block in model.layers.values():
        block_plan = {
            "attention": PrepareModuleInput(
                input_layouts=(residual, None, None),
                desired_input_layouts=(Replicate(), None, None),
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
            "feed_forward": PrepareModuleInput(
                input_layouts=(residual,), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=residual),
            "feed_forward.w3": ColwiseParallel(),
        }
        if sequence_parallel:
            block_plan["attention_norm"] = SequenceParallel()
            block_plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, block_plan)


def parallelize_llama3(model: nn.Module, parallel_dims: ParallelDims, config: Config) -> None:
    """Apply every configured parallelism to ``model`` (on meta) in place."""
    meshes, p = parallel_dims.meshes, config.parallelism
    if config.float8.enable and parallel_dims.tp > 1:
        raise ConfigError("--float8.enable with --parallelism.tp > 1 is not supported yet")
    apply_float8(model, config.float8, skip_fqns={"output"})
    if parallel_dims.tp > 1:
        apply_tensor_parallel(
            model,
            meshes["tp"],
            sequence_parallel=p.enable_sequence_parallel,
            loss_parallel=p.enable_loss_parallel,
        )
    apply_activation_checkpointing(model.layers, config.activation_checkpoint)
    apply_compile(model, model.layers, config.compile, whole_model=parallel_dims.tp > 1)

    mp_policy = mixed_precision_policy(
        config.training.mixed_precision_param,
        config.training.mixed_precision_reduce,
        meshes["world"].device_type,
    )
    blocks = list(model.layers.values())
    if parallel_dims.fsdp_enabled:
        apply_fsdp(
            model,
            blocks,
            meshes["fsdp"],
            mp_policy=mp_policy,
            reshard_after_forward=p.fsdp_reshard_after_forward,
            cpu_offload=config.training.enable_cpu_offload,
        )
    elif parallel_dims.dp_replicate > 1:
        apply_ddp(model, blocks, meshes["dp_replicate"], mp_policy=mp_policy)
