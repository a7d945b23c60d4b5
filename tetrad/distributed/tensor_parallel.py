"""Megatron-style tensor parallel for any Llama-like decoder, written once by module role; a
family names its modules (``DecoderRoles``) and nothing else.

q/k/v and gate/up projections split by output columns, o/down by input rows, so each block
needs one reduction after attention and one after the MLP. With sequence parallel those
reductions become reduce-scatters along the sequence and norms/residuals run on 1/tp of the
tokens; the all-gather back happens where a block's input enters attention or the MLP. The
embedding and the output projection split along the vocabulary; the logits stay vocab-sharded
for loss parallel.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


@dataclass(frozen=True, kw_only=True)
class DecoderRoles:
    """A family's module names for the roles of a Llama-like decoder: top-level names relative
    to the model, the rest relative to one block."""

    embedding: str
    final_norm: str
    output: str
    attention: str
    q: str
    k: str
    v: str
    o: str
    mlp: str
    gate: str
    up: str
    down: str
    attention_norm: str
    mlp_norm: str
    attention_input_kwarg: str | None = None
    """The keyword a block passes attention's hidden states by (HF: ``hidden_states``); None:
    positionally, as attention's only positional argument."""
    head_norms: tuple[str, ...] = ()
    """Per-head norms inside attention (Qwen3's q_norm, k_norm), where a block has them."""


class TensorParallelStyles(NamedTuple):
    """The styles a plan uses for the (possibly float8) block linears and the modules whose
    input they all-gather; the embedding and the output projection keep torch's."""

    colwise: type[ColwiseParallel]
    rowwise: type[RowwiseParallel]
    prepare_input: type[PrepareModuleInput]


TORCH_STYLES = TensorParallelStyles(ColwiseParallel, RowwiseParallel, PrepareModuleInput)


def apply_tensor_parallel(
    model: nn.Module,
    blocks: nn.Module,
    roles: DecoderRoles,
    tp_mesh: DeviceMesh,
    styles: TensorParallelStyles,
    *,
    sequence_parallel: bool,
    loss_parallel: bool,
    whole_mlps: Collection[nn.Module] = (),
) -> None:
    """Shard ``model`` (on meta, in place) over ``tp_mesh`` by ``roles``. A block whose MLP is
    one of ``whole_mlps`` (a mixture of experts) keeps it whole: it gets every token of the
    batch, gathered, and each tp rank computes it alike (its experts split by expert parallel
    instead), handing the residual stream back in its layout."""
    residual = Shard(1) if sequence_parallel else Replicate()
    root_plan: dict[str, Any] = {
        roles.embedding: RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        roles.output: ColwiseParallel(
            input_layouts=residual,
            # Vocab-sharded logits stay sharded for loss_parallel; otherwise gather them.
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sequence_parallel:
        root_plan[roles.final_norm] = SequenceParallel()
    parallelize_module(model, tp_mesh, root_plan)

    r = roles
    if r.attention_input_kwarg is None:
        gather_attention_input = styles.prepare_input(
            input_layouts=(residual,), desired_input_layouts=(Replicate(),)
        )
    else:
        gather_attention_input = styles.prepare_input(
            input_kwarg_layouts={r.attention_input_kwarg: residual},
            desired_input_kwarg_layouts={r.attention_input_kwarg: Replicate()},
        )
    whole = {id(m) for m in whole_mlps}
    for block in blocks.children():
        plan: dict[str, Any] = {
            r.attention: gather_attention_input,
            f"{r.attention}.{r.q}": styles.colwise(),
            f"{r.attention}.{r.k}": styles.colwise(),
            f"{r.attention}.{r.v}": styles.colwise(),
            f"{r.attention}.{r.o}": styles.rowwise(output_layouts=residual),
        }
        if id(block.get_submodule(r.mlp)) in whole:
            plan[r.mlp] = PrepareModuleInputOutput(
                input_layouts=(residual,),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(residual,),
                use_local_output=True,
            )
        else:
            plan[r.mlp] = styles.prepare_input(
                input_layouts=(residual,), desired_input_layouts=(Replicate(),)
            )
            plan[f"{r.mlp}.{r.gate}"] = styles.colwise()
            plan[f"{r.mlp}.{r.up}"] = styles.colwise()
            plan[f"{r.mlp}.{r.down}"] = styles.rowwise(output_layouts=residual)
        for name in r.head_norms:
            # [B, T, local heads, head_dim] is sharded on dim 2; the norm weights' gradients
            # are summed over the tp ranks.
            plan[f"{r.attention}.{name}"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if sequence_parallel:
            plan[r.attention_norm] = SequenceParallel()
            plan[r.mlp_norm] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
