"""Mixture-of-experts families: ``qwen3_moe`` (Qwen3-MoE) and ``deepseek_moe`` (DeepSeek-V3's
MoE design with grouped-query attention), one model class, two preset tables."""

from tetrad.models.moe.layer import MoE, Router
from tetrad.models.moe.model import MoEConfig, MoETransformer, count_params, num_flops_per_token
from tetrad.models.moe.parallelize import check_parallelism, parallelize_moe
from tetrad.models.moe.presets import deepseek_moe_presets, qwen3_moe_presets
from tetrad.models.moe.state_dict_adapter import Qwen3MoeStateDictAdapter
from tetrad.models.spec import ModelSpec

qwen3_moe_spec = ModelSpec(
    name="qwen3_moe",
    presets=qwen3_moe_presets,
    build_model=MoETransformer,
    num_flops_per_token=num_flops_per_token,
    parallelize_fn=parallelize_moe,
    check_parallelism=check_parallelism,
    state_dict_adapter=Qwen3MoeStateDictAdapter,
)

deepseek_moe_spec = ModelSpec(
    name="deepseek_moe",
    presets=deepseek_moe_presets,
    build_model=MoETransformer,
    num_flops_per_token=num_flops_per_token,
    parallelize_fn=parallelize_moe,
    check_parallelism=check_parallelism,
)

__all__ = [
    "MoE",
    "MoEConfig",
    "MoETransformer",
    "Qwen3MoeStateDictAdapter",
    "Router",
    "count_params",
    "deepseek_moe_spec",
    "qwen3_moe_spec",
]
