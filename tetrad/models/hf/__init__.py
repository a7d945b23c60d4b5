"""The Hugging Face Transformers backend: any local folder or hub id holding a ``*ForCausalLM``
config (and, usually, safetensors weights), trained with tetrad's parallelisms, unchanged.

``--model.name hf --model.hf_path <folder or hub id>``; the folder's config.json is the model's
definition (``--model.flavor`` is unused), ``--model.hf_overrides key=value,...`` changes it
explicitly (logged), and the weights load from its safetensors unless ``--model.hf_init random``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tetrad.config import Config
from tetrad.models.hf.config import NATIVE_FAMILIES, HFModelConfig, resolve_hf_config
from tetrad.models.hf.model import (
    HFCausalLM,
    HFGenericCausalLM,
    build_hf_model,
    count_params,
    num_flops_per_token,
)
from tetrad.models.hf.parallelize import parallelize_hf
from tetrad.models.spec import ModelSpec


class HFStateDictAdapter:
    """tetrad FQN ↔ HF key for a wrapped HF model: tensors are HF's own, unchanged; the
    Llama-like wrapper holds the base model's modules at the top level, so their keys gain
    HF's ``model.`` prefix. A tied lm_head is not stored (HF re-ties it on load)."""

    def __init__(self, config: HFModelConfig) -> None:
        import transformers

        self.config = config
        cls = getattr(transformers, config.architecture)
        # HF's keys of the parameters that are another's when embeddings are tied.
        self.tied_keys = set(getattr(cls, "_tied_weights_keys", None) or ())

    def hf_key(self, fqn: str) -> str | None:
        key = f"model.{fqn}" if self.config.native and not fqn.startswith("lm_head.") else fqn
        if self.config.tie_embeddings and key in self.tied_keys:
            return None
        return key

    def to_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def from_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def hf_config(self) -> dict[str, Any]:
        return self.config.hf_dict()


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
    "count_params",
    "hf_spec",
    "num_flops_per_token",
    "resolve_hf_config",
]
