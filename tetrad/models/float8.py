"""Low-precision training through torchao: linears compute their matmuls in float8 with scales.

tensorwise/rowwise: ``Float8Linear`` (one scale per tensor or per row); on Hopper-class GPUs this
roughly doubles matmul throughput, and on CPUs torchao's kernels still run (slowly), which lets
the conversion and its numerics be tested anywhere. mxfp8: torchao's MX training recipe (one
power-of-two scale per 32 elements), whose kernels need Blackwell; ``--float8.emulate`` runs its
numerics anywhere.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from typing import Any

from torch import nn
from torch.distributed.tensor import DTensor

from tetrad.config.job_config import Float8Config

logger = logging.getLogger(__name__)

ModuleFilter = Callable[[nn.Module, str], bool]


def _eligible(module: nn.Module, fqn: str, skip_fqns: Collection[str], recipe: str) -> bool:
    """float8 GEMMs need both dims divisible by 16, MXFP8 by its 32-element scaling blocks. The
    output projection stays in high precision, as its logits feed the loss directly. torchao
    0.18's MXFP8 linear drops the bias, so biased linears (Qwen2's q/k/v) stay too."""
    if not isinstance(module, nn.Linear) or fqn in skip_fqns:
        return False
    if recipe == "mxfp8" and module.bias is not None:
        return False
    multiple = 32 if recipe == "mxfp8" else 16
    return module.in_features % multiple == 0 and module.out_features % multiple == 0


def apply_float8(model: nn.Module, config: Float8Config, *, skip_fqns: Collection[str]) -> None:
    """Convert eligible ``nn.Linear`` modules in place and log how many were converted. Config
    and device are validated already (``validate_config``, ``validate_device``)."""
    if not config.enable:
        return

    def module_filter(module: nn.Module, fqn: str) -> bool:
        return _eligible(module, fqn, skip_fqns, config.recipe)

    convert = _convert_mxfp8 if config.recipe == "mxfp8" else _convert_float8
    converted = convert(model, config, module_filter)
    logger.info(
        "float8 %s%s: %d linears converted, the others kept in high precision",
        config.recipe, " (emulated)" if config.emulate else "", converted,
    )  # fmt: skip


def _convert_float8(model: nn.Module, config: Float8Config, module_filter: ModuleFilter) -> int:
    """tensorwise/rowwise: swap the linears for torchao's ``Float8Linear``."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    float8_config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(config.recipe),
        emulate=config.emulate,
        enable_fsdp_float8_all_gather=config.enable_fsdp_float8_all_gather,
    )
    convert_to_float8_training(model, config=float8_config, module_filter_fn=module_filter)
    return sum(isinstance(m, Float8Linear) for m in model.modules())


def _convert_mxfp8(model: nn.Module, config: Float8Config, module_filter: ModuleFilter) -> int:
    """mxfp8: wrap the linears' weights in torchao's MXFP8 training tensor, whose matmuls
    quantize both operands (and the gradients) to MXFP8."""
    from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
    from torchao.prototype.moe_training.tensor import MXFP8TrainingWeightWrapperTensor
    from torchao.quantization import quantize_

    recipe = (
        MXFP8TrainingRecipe.MXFP8_EMULATED_RCEIL
        if config.emulate
        else MXFP8TrainingRecipe.MXFP8_RCEIL
    )
    quantize_(model, MXFP8TrainingOpConfig.from_recipe(recipe), filter_fn=module_filter)
    converted = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "weight", None), MXFP8TrainingWeightWrapperTensor)
    ]
    for module in converted:
        module.register_state_dict_post_hook(_plain_weight_in_state_dict)
    return len(converted)


def _plain_weight_in_state_dict(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """Checkpoints hold the plain weight: DCP would pickle torchao's wrapper class, which
    loading (weights_only) refuses and which would tie checkpoints to the recipe. The plain
    tensor shares the wrapper's storage, so a load in place still fills the parameter."""
    key = prefix + "weight"
    weight = state_dict[key]
    if isinstance(weight, DTensor):  # FSDP's shard of the weight
        state_dict[key] = DTensor.from_local(
            weight.to_local()._data,  # type: ignore[attr-defined]  # torchao's wrapper
            weight.device_mesh,
            weight.placements,
            shape=weight.shape,
            stride=weight.stride(),
            run_check=False,
        )
    else:
        state_dict[key] = weight._data  # torchao's wrapper
