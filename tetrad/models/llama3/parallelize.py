"""Where the Llama-3 module structure meets the mesh: its tensor-parallel plan, applied in the
fixed order of ``tetrad.distributed.parallelize`` (float8 → TP/SP → activation checkpointing →
compile → FSDP/HSDP/DDP)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from tetrad.config import Config
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.parallelize import TensorParallelStyles, apply_parallelisms


def apply_tensor_parallel(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    styles: TensorParallelStyles,
    *,
    sequence_parallel: bool,
    loss_parallel: bool,
) -> None:
    """Megatron-style TP: q/k/v/w1/w3 split by output columns, wo/w2 by input rows, so each block
    needs one reduction after attention and one after the FFN. With sequence parallel those
    reductions become reduce-scatters along the sequence, and norms/residuals run on 1/tp of
    the tokens; the following all-gather happens where a block's input enters attention/FFN.
    The block linears and their inputs take ``styles`` (torchao's float8 ones under float8
    tensorwise); the embedding and output layer always keep torch's."""
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
            "attention": styles.prepare_input(
                input_layouts=(residual, None, None),
                desired_input_layouts=(Replicate(), None, None),
            ),
            "attention.wq": styles.colwise(),
            "attention.wk": styles.colwise(),
            "attention.wv": styles.colwise(),
            "attention.wo": styles.rowwise(output_layouts=residual),
            "feed_forward": styles.prepare_input(
                input_layouts=(residual,), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": styles.colwise(),
            "feed_forward.w2": styles.rowwise(output_layouts=residual),
            "feed_forward.w3": styles.colwise(),
        }
        if sequence_parallel:
            block_plan["attention_norm"] = SequenceParallel()
            block_plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, block_plan)


def parallelize_llama3(model: nn.Module, parallel_dims: ParallelDims, config: Config) -> None:
    """Apply every configured parallelism to ``model`` (on meta) in place."""
    p = config.parallelism

    def tensor_parallel(tp_mesh: DeviceMesh, styles: TensorParallelStyles) -> None:
        apply_tensor_parallel(
            model,
            tp_mesh,
            styles,
            sequence_parallel=p.enable_sequence_parallel,
            loss_parallel=p.enable_loss_parallel,
        )

    apply_parallelisms(
        model,
        model.layers,
        parallel_dims,
        config,
        tensor_parallel=tensor_parallel,
        float8_skip_fqns={"output"},
    )
