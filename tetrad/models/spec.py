"""ModelSpec: what the trainer needs to know about a model family, and nothing more."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from tetrad.config import ConfigError


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A " did you mean 'X'?" fragment naming the closest choice, ignoring case (8b → 8B)."""
    by_lower = {choice.lower(): choice for choice in choices}
    match = difflib.get_close_matches(name.lower(), by_lower, n=1)
    return f" did you mean '{by_lower[match[0]]}'?" if match else ""


def training_flops_per_token(
    non_embedding_params: int, n_layers: int, attention_dim: int, seq_len: int
) -> int:
    """6·N for the forward and backward matmuls over the N non-embedding parameters (the output
    projection counts, tied or not), plus 6·2·n_layers·attention_dim·seq_len for QKᵀ and
    attention·V (Kaplan et al. 2020, no discount for the causal mask)."""
    return 6 * non_embedding_params + 12 * n_layers * attention_dim * seq_len


class StateDictAdapter(Protocol):
    """Maps one model config's parameters to and from the Hugging Face layout, one tensor at a
    time, so a rank can load or export only the tensors it holds."""

    tied_keys: set[str]
    """HF keys of a tied model's shared copy (lm_head.weight), which checkpoints may hold or
    not; empty for an untied model."""

    def hf_key(self, fqn: str) -> str | None:
        """The HF key of tetrad's ``fqn``; None for a tensor HF does not store (a tied output)."""
        ...

    def to_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        """A full (unsharded) tensor in tetrad's layout → HF's layout."""
        ...

    def from_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_hf``."""
        ...

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` that ``transformers.AutoConfig`` reads for this model."""
        ...


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    """Registry name, the value of --model.name."""

    presets: Mapping[str, Any]
    """Config dataclasses (with a vocab_size field) by flavor, the values of --model.flavor."""

    build_model: Callable[[Any], nn.Module]
    """config → model; called under torch.device("meta"), so it must not initialise weights.
    The model provides ``init_module_parameters(fqn, module)`` (the module's own parameters,
    full-size, from the global RNG; ``tetrad.distributed.materialize`` seeds each module and
    keeps each rank's shards) and ``init_buffers(buffer_device)`` (only the non-persistent
    buffers, e.g. rotary tables, and ties)."""

    num_flops_per_token: Callable[[Any, int], int]
    """(config, seq_len) → training FLOPs per token, for MFU."""

    parallelize_fn: Callable[..., None] | None = None
    """Applies TP/SP, activation checkpointing, compile and FSDP to a model in place: the one
    place where a family's module structure meets the device mesh."""

    state_dict_adapter: Callable[[Any], StateDictAdapter] | None = None
    """config → adapter for Hugging Face import/export; None = no HF format for this family."""

    resolve_config: Callable[[Any, int], Any] | None = None
    """(job Config, tokenizer vocab size) → model config, for families defined by files rather
    than presets (the HF backend: config.json + overrides); None = ``config_for`` a preset."""

    default_tokenizer: Callable[[Any], str | None] | None = None
    """job Config → the tokenizer to use when --data.tokenizer is unset (e.g. the model's own
    folder); None = the embedded default."""

    weights_folder: Callable[[Any], Path | None] | None = None
    """model config → a folder of HF safetensors to load (through ``state_dict_adapter``) in
    place of initialisation; None (or returning None) = initialise from the seed."""

    pipeline_first: tuple[str, ...] = ("tok_embeddings",)
    """Top-level modules only the first pipeline stage keeps (the token embedding)."""

    pipeline_last: tuple[str, ...] = ("norm", "output")
    """Top-level modules only the last pipeline stage keeps (final norm, output projection)."""

    def model_config(self, config: Any, *, vocab_size: int) -> Any:
        """The model config a job Config asks for: the family's own resolution (files), else
        the --model.flavor preset."""
        if self.resolve_config is not None:
            return self.resolve_config(config, vocab_size)
        return self.config_for(config.model.flavor, vocab_size=vocab_size)

    def tokenizer_for(self, config: Any) -> str | None:
        """--data.tokenizer, else the family's own (an HF model's folder); None = embedded."""
        if config.data.tokenizer is not None:
            return config.data.tokenizer
        return self.default_tokenizer(config) if self.default_tokenizer else None

    def config_for(self, flavor: str, *, vocab_size: int) -> Any:
        """A copy of the preset, its vocab_size taken from the tokenizer where the preset has 0."""
        if flavor not in self.presets:
            raise ConfigError(
                f"unknown --model.flavor '{flavor}' for {self.name};"
                f"{did_you_mean(flavor, self.presets)} available: {', '.join(self.presets)}"
            )
        preset = self.presets[flavor]
        if preset.vocab_size == 0:
            return dataclasses.replace(preset, vocab_size=vocab_size)
        if preset.vocab_size < vocab_size:
            raise ConfigError(
                f"{self.name} '{flavor}' has vocab_size {preset.vocab_size}, fewer than the "
                f"tokenizer's {vocab_size}; use a smaller tokenizer or a preset with vocab_size 0"
            )
        return dataclasses.replace(preset)
