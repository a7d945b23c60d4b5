"""The model as a run holds it before any memory is allocated: built on meta, split into this
rank's pipeline stages, and parallelized. One build path for training, the dry run and the
memory estimate, so what they report is what training runs."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from tetrad.config import Config, ConfigError
from tetrad.distributed.context_parallel import ContextParallel
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.pipeline import PipelinePlan, plan_pipeline, split_model
from tetrad.models.attention import (
    AttentionFn,
    ContextParallelAttention,
    FlexDocumentAttention,
    causal_sdpa,
)
from tetrad.models.lora import apply_lora, lora_flops_per_token
from tetrad.models.registry import get_model_spec
from tetrad.models.spec import DecoderModel, ModelSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetaModel:
    """This rank's parallelized model parts, still on meta, and what was resolved on the way."""

    spec: ModelSpec[Any]
    model_config: Any
    model_name: str
    parts: list[DecoderModel]
    """The whole model, or this rank's pipeline stages (each keeps full-model FQNs)."""
    plan: PipelinePlan | None
    """The pipeline split; None without pipeline parallel."""
    total_params: int
    """Parameters of the whole model, over every rank."""
    flops_per_token: int


def attention_for(
    config: Config, context_parallel: ContextParallel | None, device_type: str
) -> AttentionFn:
    """The attention every layer computes: across the cp ranks under context parallel;
    FlexAttention for packed documents on GPU; else SDPA over the local sequence (with a dense
    block-causal mask for packed documents)."""
    if context_parallel is not None:
        return ContextParallelAttention(context_parallel)
    if config.data.document_masked and device_type == "cuda":
        return FlexDocumentAttention()
    return causal_sdpa


def build_meta_model(
    config: Config,
    parallel_dims: ParallelDims,
    *,
    vocab_size: int,
    attention: AttentionFn,
    n_layers: int | None = None,
) -> MetaModel:
    """Build on meta, [split into pipeline stages], parallelize each part: the model parts the
    rank at ``parallel_dims``' mesh coordinates holds, with no storage allocated. ``n_layers``
    replaces the preset's block count (the memory estimate's scaled builds; families whose
    model config is a dataclass with an ``n_layers`` field)."""
    spec = get_model_spec(config.model.name)
    model_config = spec.model_config(config, vocab_size=vocab_size)
    if n_layers is not None:
        model_config = dataclasses.replace(model_config, n_layers=n_layers)
    model_name = getattr(model_config, "architecture", config.model.flavor)
    seq_len, max_seq_len = config.training.seq_len, model_config.max_seq_len
    if seq_len > max_seq_len:
        raise ConfigError(
            f"--training.seq_len {seq_len} exceeds {model_name}'s rotary table of {max_seq_len} "
            "positions; use a shorter --training.seq_len or a model with a longer context"
        )
    if spec.check_parallelism is not None:
        spec.check_parallelism(model_config, config)
    with torch.device("meta"):
        model = spec.build_model(model_config)
    model.set_attention(attention)
    if parallel_dims.ep_enabled:
        _check_expert_parallel(model, parallel_dims.ep, model_name)
    if config.lora.rank > 0:
        roles = spec.decoder_roles(model_config) if spec.decoder_roles else None
        apply_lora(model, roles, config.lora, model_name=model_name)
    flops_per_token = spec.num_flops_per_token(model_config, seq_len)
    if config.lora.rank > 0:
        flops_per_token = lora_flops_per_token(model, flops_per_token)
    total_params = sum(p.numel() for p in model.parameters())
    parts: list[DecoderModel] = [model]
    plan = None
    if parallel_dims.pp > 1:
        block_names = [name for name, _ in model.blocks().named_children()]
        pp_rank = parallel_dims.meshes["pp"].get_local_rank()
        plan = plan_pipeline(config, block_names, pp_rank)
        parts = split_model(model, plan, first=spec.pipeline_first, last=spec.pipeline_last)
    for part in parts:
        spec.parallelize_fn(part, parallel_dims, config)
    return MetaModel(spec, model_config, model_name, parts, plan, total_params, flops_per_token)


def _check_expert_parallel(model: DecoderModel, ep: int, model_name: str) -> None:
    """Expert parallel needs routed experts, in a number it divides (every family alike)."""
    layers = model.moe_layers()
    if not layers:
        raise ConfigError(
            f"--parallelism.ep {ep}: {model_name} has no routed experts to split; "
            "use --parallelism.ep 1"
        )
    experts = layers[0].get_parameter("experts.w1").shape[0]
    if experts % ep:
        raise ConfigError(
            f"--parallelism.ep {ep} does not divide {model_name}'s {experts} routed experts"
        )
