"""Where HF module structure meets the mesh: float8 → TP/SP → activation checkpointing →
compile → FSDP/HSDP/DDP, the same contract and order as llama3.

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
from tetrad.models.hf.config import NATIVE_FAMILIES, HFModelConfig


def _check_tensor_parallel(config: HFModelConfig, tp: int) -> None:
    if not config.native:
        raise ConfigError(
            f"{config.architecture} is not yet supported for --parallelism.tp > 1 "
            f"(supported: {', '.join(NATIVE_FAMILIES.values())}); FSDP is"
        )
    if config.tie_embeddings:
        raise ConfigError(
            f"{config.source} ties lm_head to embed_tokens (tie_word_embeddings), which "
            "--parallelism.tp > 1 does not support yet; use FSDP"
        )
    for what, n in (("attention heads", config.n_heads), ("kv heads", config.kv_heads)):
        if n % tp:
            raise ConfigError(f"--parallelism.tp {tp} does not divide {config.source}'s {n} {what}")


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool
) -> None:
    """Megatron-style TP on an ``HFCausalLM``: one reduction after attention and one after the
    MLP per layer (reduce-scatters along the sequence under sequence parallel, where norms and
    residuals run on 1/tp of the tokens)."""
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
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": residual},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
            "mlp": PrepareModuleInput(
                input_layouts=(residual,), desired_input_layouts=(Replicate(),)
            ),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=residual),
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
    """Apply every configured parallelism to an HF model (on meta) in place."""
    meshes, p = parallel_dims.meshes, config.parallelism
    model_config: HFModelConfig = model.config
    if config.float8.enable and parallel_dims.tp > 1:
        raise ConfigError("--float8.enable with --parallelism.tp > 1 is not supported yet")
    apply_float8(model, config.float8, skip_fqns={"lm_head"})
    if parallel_dims.tp > 1:
        _check_tensor_parallel(model_config, parallel_dims.tp)
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
    blocks = list(model.layers.children())
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
