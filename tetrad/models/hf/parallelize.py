"""The HF families' names for the decoder roles and what their configs allow under each layout.
The Llama-like (native) families name the roles alike; other architectures run transformers'
own forward, which tetrad cannot split by layer, so they take data parallelism only."""

from __future__ import annotations

from tetrad.config import Config
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.tensor_parallel import DecoderRoles
from tetrad.errors import ConfigError
from tetrad.models.hf.config import NATIVE_FAMILIES, HFModelConfig
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
        head_norms=("q_norm", "k_norm") if config.hf_config.model_type == "qwen3" else (),
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
    if p.tp > 1:
        if model_config.tie_embeddings:
            raise ConfigError(
                f"{model_config.source} ties lm_head to embed_tokens (tie_word_embeddings), "
                "which --parallelism.tp > 1 does not support yet; use FSDP"
            )
        check_heads_split(
            str(model_config.source), model_config.n_heads, model_config.kv_heads, p.tp
        )
