"""ModelSpec: what the trainer needs to know about a model family, and nothing more."""

from __future__ import annotations

import dataclasses
import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

from tetrad.config import Config
from tetrad.errors import ConfigError
from tetrad.models.attention import AttentionFn

if TYPE_CHECKING:
    from tetrad.distributed.parallel_dims import ParallelDims
    from tetrad.distributed.tensor_parallel import DecoderRoles


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A " did you mean 'X'?" fragment naming the closest choice, ignoring case (8b → 8B)."""
    by_lower = {choice.lower(): choice for choice in choices}
    match = difflib.get_close_matches(name.lower(), by_lower, n=1)
    return f" did you mean '{by_lower[match[0]]}'?" if match else ""


class StateDictAdapter(Protocol):
    """Maps one model config's parameters to and from the Hugging Face layout, one tensor at a
    time, so a rank can load or export only the tensors it holds.

    A tensor is usually one HF key; a tensor HF stores in pieces along dim 0 (a routed expert
    tensor [E, out, in], one key per expert) is several, and a rank whose shard holds only some
    of its rows reads only those rows' keys."""

    tied_keys: set[str]
    """HF keys of a tied model's shared copy (lm_head.weight), which checkpoints may hold or
    not; empty for an untied model."""

    def hf_keys(self, fqn: str) -> list[str]:
        """The HF keys of tetrad's ``fqn``: one; none for a tensor HF does not store (a tied
        output); several, in row order, for a tensor stacked along dim 0 from HF's pieces."""
        ...

    def to_hf(self, fqn: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """A full (unsharded) tensor in tetrad's layout → the tensors of ``hf_keys(fqn)``."""
        ...

    def from_hf(self, fqn: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of ``to_hf``; for a stacked tensor, the pieces of any contiguous run of
        its rows (a shard's) → those rows."""
        ...

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` that ``transformers.AutoConfig`` reads for this model."""
        ...


class ModelConfig(Protocol):
    """What the trainer reads of any family's model config (a dataclass)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @property
    def vocab_size(self) -> int:
        """Embedding rows; a preset's 0 means "the tokenizer's" (``ModelSpec.config_for``)."""
        ...

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the model's positions cover."""
        ...


C = TypeVar("C", bound=ModelConfig)


class DecoderModel(nn.Module, ABC):
    """What every family's model provides to the trainer, the parallelisms and checkpoints.

    Built under ``torch.device("meta")`` and never initialised there: materialisation
    (``tetrad.models.materialize``) seeds each module and calls ``init_module_parameters`` on
    it, then ``init_buffers``. Blocks are the unit of activation checkpointing, compile, FSDP
    and pipeline splitting; a pipeline stage deletes the blocks and top-level modules it does
    not own (``ModelSpec.pipeline_first``/``pipeline_last`` set to None), so every parameter
    keeps its whole-model FQN."""

    @abstractmethod
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] (or hidden states [B, T, dim] on a later pipeline stage); positions
        [T] or [B, T] rows of the position table, default 0..T-1, or each token's index in its
        document (context parallel's chunks and pipeline stages pass theirs); document_ids
        [B, T] of the whole sequence: packed documents attend only within themselves. Returns
        logits [B, T, vocab] (or hidden states)."""

    @abstractmethod
    def blocks(self) -> nn.ModuleDict | nn.ModuleList:
        """The transformer blocks, in order; a ModuleDict by index where pipeline parallel
        applies (stages delete entries)."""

    @abstractmethod
    def init_module_parameters(self, fqn: str, module: nn.Module) -> None:
        """Initialise the own parameters of the submodule at ``fqn`` (full-size, possibly a
        stand-in) from the global RNG, by the family's rule for that module."""

    @abstractmethod
    def init_buffers(self, buffer_device: torch.device | None = None) -> None:
        """Recompute the non-persistent buffers (rotary tables: garbage after ``to_empty``, in
        no checkpoint) on ``buffer_device`` and re-tie shared parameters; weights untouched."""

    @abstractmethod
    def set_attention(self, attention: AttentionFn) -> None:
        """Make every attention layer call ``attention`` (``tetrad.models.attention``)."""

    # Mixture-of-experts models override these four; a dense model has no routing to balance.
    def moe_layers(self) -> Sequence[nn.Module]:
        """The mixture-of-experts feed-forwards this model (part) holds, in order: each routes
        tokens with ``router.gate`` (a linear) to ``experts``, which takes rows sorted by
        expert (``tetrad.distributed.expert_parallel``'s contract)."""
        return []

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the last forward (with its coefficient), summed over the
        batch's sequences; a pipeline stage's share of the whole model's (the stages' add up to
        it). The trainer divides it by the global batch's sequence count and adds its gradient
        within the part's backward (``tetrad.components.expert_balance``). None = none."""
        return None

    def expert_loads(self) -> torch.Tensor | None:
        """Tokens the last forward routed to each expert, [MoE layers, experts] float32,
        detached; None for a model without routed experts."""
        return None

    def update_after_step(self, loads: torch.Tensor) -> None:
        """Called after each optimizer step with the step's ``expert_loads`` summed over its
        micro-batches and data-parallel ranks (auxiliary-loss-free balancing moves its
        routing biases here); no-op by default."""


ParallelizeFn = Callable[[DecoderModel, "ParallelDims", Config], None]


@dataclass(frozen=True, kw_only=True)
class ModelSpec(Generic[C]):
    name: str
    """Registry name, the value of --model.name."""

    presets: Mapping[str, C]
    """Config dataclasses by flavor, the values of --model.flavor."""

    build_model: Callable[[C], DecoderModel]
    """config → model; called under torch.device("meta"), so it must not initialise weights."""

    num_flops_per_token: Callable[[C, int], int]
    """(config, seq_len) → training FLOPs per token, for MFU."""

    parallelize_fn: ParallelizeFn
    """Applies float8, TP/SP, activation checkpointing, compile and FSDP to a model in place:
    the one place where a family's module structure meets the device mesh."""

    check_parallelism: Callable[[C, Config], None] | None = None
    """Rejects, with one line, a layout this model cannot take (heads that tp does not divide,
    an architecture tetrad cannot split); called before anything is built."""

    decoder_roles: Callable[[C], DecoderRoles | None] | None = None
    """config → the family's module names by role (LoRA's targets); None (or returning None)
    = a model whose projections tetrad does not know."""

    state_dict_adapter: Callable[[C], StateDictAdapter] | None = None
    """config → adapter for Hugging Face import/export; None = no HF format for this family."""

    resolve_config: Callable[[Config, int], C] | None = None
    """(job Config, tokenizer vocab size) → model config, for families defined by files rather
    than presets (the HF backend: config.json + overrides); None = ``config_for`` a preset."""

    default_tokenizer: Callable[[Config], str | None] | None = None
    """job Config → the tokenizer to use when --data.tokenizer is unset (e.g. the model's own
    folder); None = the embedded default."""

    weights_folder: Callable[[C], Path | None] | None = None
    """model config → a folder of HF safetensors to load (through ``state_dict_adapter``) in
    place of initialisation; None (or returning None) = initialise from the seed."""

    pipeline_first: tuple[str, ...] = ("tok_embeddings",)
    """Top-level modules only the first pipeline stage keeps (the token embedding)."""

    pipeline_last: tuple[str, ...] = ("norm", "output")
    """Top-level modules only the last pipeline stage keeps (final norm, output projection)."""

    def model_config(self, config: Config, *, vocab_size: int) -> C:
        """The model config a job Config asks for: the family's own resolution (files), else
        the --model.flavor preset."""
        if self.resolve_config is not None:
            return self.resolve_config(config, vocab_size)
        return self.config_for(config.model.flavor, vocab_size=vocab_size)

    def tokenizer_for(self, config: Config) -> str | None:
        """--data.tokenizer, else the family's own (an HF model's folder); None = embedded."""
        if config.data.tokenizer is not None:
            return config.data.tokenizer
        return self.default_tokenizer(config) if self.default_tokenizer else None

    def config_for(self, flavor: str, *, vocab_size: int) -> C:
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
