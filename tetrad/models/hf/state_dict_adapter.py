"""tetrad FQN ↔ Hugging Face key for a wrapped HF model: the tensors are HF's own, unchanged.

The Llama-like wrapper (``HFCausalLM``) holds the base model's modules at the top level, so
their keys gain HF's ``model.`` prefix; the generic wrapper keeps HF's names. A tied lm_head is
not stored (HF re-ties it on load). A mixture of experts' swapped blocks map to the checkpoint's
one tensor per expert (``tetrad.models.hf.moe``).
"""

from __future__ import annotations

from typing import Any

import torch

from tetrad.models.hf.config import HFModelConfig, import_transformers
from tetrad.models.hf.moe import is_stacked, moe_hf_keys


class HFStateDictAdapter:
    """The per-tensor ``StateDictAdapter`` (tetrad/models/spec.py) of one HF model config."""

    def __init__(self, config: HFModelConfig) -> None:
        self.config = config
        cls = getattr(import_transformers(), config.architecture)
        # HF's keys of the parameters that are another's when embeddings are tied (a dict in
        # transformers 5): not exported, and ignored where a checkpoint stores them anyway.
        tied = set(getattr(cls, "_tied_weights_keys", None) or ())
        self.tied_keys: set[str] = tied if config.tie_embeddings else set()

    def hf_keys(self, fqn: str) -> list[str]:
        if self.config.moe and (keys := moe_hf_keys(self.config.hf_config, fqn)) is not None:
            return keys
        key = f"model.{fqn}" if self.config.native and not fqn.startswith("lm_head.") else fqn
        return [] if key in self.tied_keys else [key]

    def to_hf(self, fqn: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        return list(tensor.unbind(0)) if is_stacked(fqn) else [tensor]

    def from_hf(self, fqn: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A stacked experts' tensor from its experts' (or a shard's run of them); any other
        tensor as it is."""
        if is_stacked(fqn):
            return torch.stack(tensors)
        (tensor,) = tensors
        return tensor

    def hf_config(self) -> dict[str, Any]:
        return self.config.hf_dict()
