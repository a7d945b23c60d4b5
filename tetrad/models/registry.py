"""Model families by --model.name."""

from __future__ import annotations

from typing import Any

from tetrad.errors import ConfigError
from tetrad.models.hf import hf_spec
from tetrad.models.llama3 import llama3_spec
from tetrad.models.moe import deepseek_moe_spec, qwen3_moe_spec
from tetrad.models.spec import ModelSpec, did_you_mean

_SPECS: dict[str, ModelSpec[Any]] = {
    spec.name: spec for spec in (llama3_spec, qwen3_moe_spec, deepseek_moe_spec, hf_spec)
}


def get_model_spec(name: str) -> ModelSpec[Any]:
    """The registered spec called ``name``; a one-line ValueError with a suggestion otherwise."""
    if name not in _SPECS:
        raise ConfigError(
            f"unknown --model.name '{name}';{did_you_mean(name, _SPECS)} "
            f"available: {', '.join(_SPECS)}"
        )
    return _SPECS[name]
