"""Float8 training through torchao: linears compute their matmuls in float8 with scales.

On Hopper-class GPUs this roughly doubles matmul throughput; on CPUs torchao's kernels still run
(slowly), which lets the conversion and its numerics be tested anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from torch import nn

from tetrad.config import ConfigError
from tetrad.config.job_config import Float8Config


def _float8_eligible(module: nn.Module, fqn: str, skip_fqns: Collection[str]) -> bool:
    """float8 GEMMs need both dims divisible by 16; the output projection stays in high
    precision, as its logits feed the loss directly."""
    if not isinstance(module, nn.Linear) or fqn in skip_fqns:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(model: nn.Module, config: Float8Config, *, skip_fqns: Collection[str]) -> None:
    """Swap eligible ``nn.Linear`` modules for torchao's ``Float8Linear`` in place."""
    if not config.enable:
        return
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    float8_config = Float8LinearConfig.from_recipe_name(config.recipe)
    if config.enable_fsdp_float8_all_gather:
        if config.recipe != "tensorwise":
            raise ConfigError(
                "--float8.enable_fsdp_float8_all_gather needs --float8.recipe tensorwise"
            )
        float8_config = dataclasses.replace(float8_config, enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(
        model,
        config=float8_config,
        module_filter_fn=lambda module, fqn: _float8_eligible(module, fqn, skip_fqns),
    )
