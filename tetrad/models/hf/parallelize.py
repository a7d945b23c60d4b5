"""The HF families' names for the decoder roles and what their configs allow under each layout.
The Llama-like (native) families name the roles alike; other architectures run transformers'
own forward, which tetrad cannot split by layer, so they take data parallelism only. Mixtures of
experts (their blocks swapped for tetrad's ``MoE``) take data and expert parallelism, and context
parallel without the balance loss, for now."""

from __future__ import annotations

from tetrad.config import Config
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.tensor_parallel import DecoderRoles
from tetrad.errors import ConfigError
from tetrad.models.hf.config import NATIVE_FAMILIES, HFModelConfig
from tetrad.models.hf.moe import aux_loss_coef, check_moe_config
from tetrad.models.parallelize import check_heads_split, parallelize_decoder
from tetrad.models.spec import DecoderModel


def hf_roles(config: HFModelConfig) -> DecoderRoles | None:
    """The roles of a native family's modules; None for the others."""
    if not config.native:
        return None
    return DecoderRoles(
        embedding="embed_tokens",
        final_norm="norm",
        output="lm_head",
        attention="self_attn",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="o_proj",
        mlp="mlp",
        gate="gate_proj",
        up="up_proj",
        down="down_proj",
        attention_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        # HF decoder layers call self_attn with keyword arguments, the MLP positionally.
        attention_input_kwarg="hidden_states",
        head_norms=("q_norm", "k_norm")
        if config.hf_config.model_type in ("qwen3", "qwen3_moe")
        else (),
    )


def parallelize_hf(model: DecoderModel, parallel_dims: ParallelDims, config: Config) -> None:
    assert isinstance(model.config, HFModelConfig)
    parallelize_decoder(
        model, parallel_dims, config, roles=hf_roles(model.config), output_fqn="lm_head"
    )


def check_parallelism(model_config: HFModelConfig, config: Config) -> None:
    """One line for a layout the model cannot take, before anything is built."""
    p = config.parallelism
    dropout = getattr(model_config.hf_config, "attention_dropout", 0.0) or 0.0
    if config.data.document_masked and dropout > 0:
        raise ConfigError(
            f"{model_config.architecture} has attention_dropout {dropout}, which packed "
            "documents' block-causal attention (FlexAttention on GPU) does not support; pass "
            "--model.hf_overrides attention_dropout=0"
        )
    if p.cp > 1 and dropout > 0:
        raise ConfigError(
            f"{model_config.architecture} has attention_dropout {dropout}, which context "
            "parallel does not support; pass --model.hf_overrides attention_dropout=0"
        )
    if not model_config.native and config.data.document_masked:
        raise ConfigError(
            f"{model_config.architecture} runs transformers' own attention, which cannot keep "
            "packed documents apart (--data.format chat, --data.document_mask); supported: "
            f"{', '.join(NATIVE_FAMILIES.values())}"
        )
    if not model_config.native:
        supported = ", ".join(NATIVE_FAMILIES.values())
        for name in ("tp", "pp", "cp"):
            if getattr(p, name) > 1:
                raise ConfigError(
                    f"{model_config.architecture} is not yet supported for --parallelism.{name} "
                    f"> 1 (supported: {supported}); FSDP/HSDP/DDP, activation checkpointing and "
                    "compile work for every architecture"
                )
    if model_config.moe:
        _check_moe(model_config, config)
    if p.tp > 1:
        if model_config.tie_embeddings:
            raise ConfigError(
                f"{model_config.source} ties lm_head to embed_tokens (tie_word_embeddings), "
                "which --parallelism.tp > 1 does not support yet; use FSDP"
            )
        check_heads_split(
            str(model_config.source), model_config.n_heads, model_config.kv_heads, p.tp
        )


def _check_moe(model_config: HFModelConfig, config: Config) -> None:
    """What a swapped mixture of experts takes today: data, context and expert parallel (its
    ``GroupedExperts`` shard as tetrad's MoE families' do)."""
    check_moe_config(model_config.hf_config, model_config.source)
    p = config.parallelism
    for name in ("tp", "pp"):
        if getattr(p, name) > 1:
            raise ConfigError(
                f"--parallelism.{name} {getattr(p, name)}: {model_config.architecture} (a mixture "
                f"of experts) trains with data and expert parallel for now; use "
                f"--parallelism.{name} 1"
            )
    if p.cp > 1 and aux_loss_coef(model_config.hf_config) > 0:
        raise ConfigError(
            f"--parallelism.cp {p.cp}: the sequence-wise balance loss needs whole sequences on "
            "a rank; use --parallelism.cp 1 or --model.hf_overrides output_router_logits=false"
        )
    mlp_targets = [t for t in config.lora.targets if t not in ("q", "k", "v", "o")]
    if config.lora.rank > 0 and mlp_targets:
        raise ConfigError(
            f"--lora.targets {','.join(mlp_targets)}: {model_config.architecture}'s experts are "
            "stacked tensors, not nn.Linear; adapt the attention projections (q,k,v,o)"
        )
