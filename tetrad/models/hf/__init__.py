"""The Hugging Face Transformers backend: any local folder or hub id holding a ``*ForCausalLM``
config (and, usually, safetensors weights), trained with tetrad's parallelisms, unchanged.

``--model.name hf --model.hf_path <folder or hub id>``; the folder's config.json is the model's
definition (``--model.flavor`` is unused), ``--model.hf_overrides key=value,...`` changes it
explicitly (logged), and the weights load from its safetensors unless ``--model.hf_init random``.
"""

from __future__ import annotations

from pathlib import Path

from tetrad.config import Config
from tetrad.models.hf.config import NATIVE_FAMILIES, HFModelConfig, resolve_hf_config
from tetrad.models.hf.model import (
    HFCausalLM,
    HFGenericCausalLM,
    build_hf_model,
    count_params,
    num_flops_per_token,
)
from tetrad.models.hf.parallelize import check_parallelism, hf_roles, parallelize_hf
from tetrad.models.hf.state_dict_adapter import HFStateDictAdapter
from tetrad.models.spec import ModelSpec


def _weights_folder(config: HFModelConfig) -> Path | None:
    return config.folder if config.init == "pretrained" else None


def _default_tokenizer(config: Config) -> str | None:
    return config.model.hf_path


hf_spec = ModelSpec(
    name="hf",
    presets={},
    build_model=build_hf_model,
    num_flops_per_token=num_flops_per_token,
    parallelize_fn=parallelize_hf,
    check_parallelism=check_parallelism,
    decoder_roles=hf_roles,
    state_dict_adapter=HFStateDictAdapter,
    resolve_config=resolve_hf_config,
    default_tokenizer=_default_tokenizer,
    weights_folder=_weights_folder,
    pipeline_first=("embed_tokens",),
    pipeline_last=("norm", "lm_head"),
)

__all__ = [
    "NATIVE_FAMILIES",
    "HFCausalLM",
    "HFGenericCausalLM",
    "HFModelConfig",
    "HFStateDictAdapter",
    "build_hf_model",
    "check_parallelism",
    "count_params",
    "hf_spec",
    "num_flops_per_token",
    "resolve_hf_config",
]
