"""Where HF module structure meets the mesh: its tensor-parallel plan, applied in the fixed
order of ``tetrad.distributed.parallelize`` (float8 → TP/SP → activation checkpointing →
compile → FSDP/HSDP/DDP), as for llama3.

The tensor-parallel plan comes from module roles, which the Llama-like families name alike:
q/k/v and gate/up projections split by output columns, o/down by input rows, the embedding and
lm_head split along the vocabulary.
"""

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

from tetrad.config import Config, ConfigError
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.parallelize import TensorParallelStyles, apply_parallelisms
from tetrad.models.hf.config import HFModelConfig


def _check_tensor_parallel(config: HFModelConfig, tp: int) -> None:
    """What the plan cannot split (non-native architectures are rejected when resolving)."""
    if config.tie_embeddings:
        raise ConfigError(
            f"{config.source} ties lm_head to embed_tokens (tie_word_embeddings), which "
            "--parallelism.tp > 1 does not support yet; use FSDP"
        )
    for what, n in (("attention heads", config.n_heads), ("kv heads", config.kv_heads)):
        if n % tp:
            raise ConfigError(f"--parallelism.tp {tp} does not divide {config.source}'s {n} {what}")


def apply_tensor_parallel(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    styles: TensorParallelStyles,
    *,
    sequence_parallel: bool,
    loss_parallel: bool,
) -> None:
    """Megatron-style TP on an ``HFCausalLM``: one reduction after attention and one after the
    MLP per layer (reduce-scatters along the sequence under sequence parallel, where norms and
    residuals run on 1/tp of the tokens). The layer linears and their inputs take ``styles``
    (torchao's float8 ones under float8 tensorwise); embed_tokens and lm_head keep torch's."""
    residual = Shard(1) if sequence_parallel else Replicate()
    root_plan = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "lm_head": ColwiseParallel(
            input_layouts=residual,
            # Vocab-sharded logits stay sharded for loss_parallel; otherwise gather them.
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sequence_parallel:
        root_plan["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, root_plan)

    for layer in model.layers.values():
        attention = layer.self_attn
        plan = {
            # HF decoder layers call self_attn with keyword arguments, the MLP positionally.
            "self_attn": styles.prepare_input(
                input_kwarg_layouts={"hidden_states": residual},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
            ),
            "self_attn.q_proj": styles.colwise(),
            "self_attn.k_proj": styles.colwise(),
            "self_attn.v_proj": styles.colwise(),
            "self_attn.o_proj": styles.rowwise(output_layouts=residual),
            "mlp": styles.prepare_input(
                input_layouts=(residual,), desired_input_layouts=(Replicate(),)
            ),
            "mlp.gate_proj": styles.colwise(),
            "mlp.up_proj": styles.colwise(),
            "mlp.down_proj": styles.rowwise(output_layouts=residual),
        }
        if hasattr(attention, "q_norm"):
            # Qwen3 normalises each head: [B, T, local heads, head_dim] is sharded on dim 2,
            # and the norm weights' gradients are summed over the tp ranks.
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if sequence_parallel:
            plan["input_layernorm"] = SequenceParallel()
            plan["post_attention_layernorm"] = SequenceParallel()
        parallelize_module(layer, tp_mesh, plan)


def parallelize_hf(model: nn.Module, parallel_dims: ParallelDims, config: Config) -> None:
    """Apply every configured parallelism to an HF model (on meta) in place. Non-native
    architectures never reach tensor parallel: resolve_hf_config rejects tp > 1 for them."""
    p = config.parallelism

    def tensor_parallel(tp_mesh: DeviceMesh, styles: TensorParallelStyles) -> None:
        _check_tensor_parallel(model.config, parallel_dims.tp)
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
        float8_skip_fqns={"lm_head"},
    )
