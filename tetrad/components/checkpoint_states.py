"""The named states of a checkpoint, each a DCP ``Stateful``: model, optimizer, data position
and train state (step, tokens seen, RNG); the LR scheduler is one itself. Apart from the manager
that saves and loads them, so the trainer can build and use them (``merged_view``) on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, get_args

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from tetrad.config.job_config import CheckpointState
from tetrad.errors import CheckpointError

CHECKPOINT_STATES: tuple[CheckpointState, ...] = get_args(CheckpointState)
"""The named states of a checkpoint, in the order they are built; the names
--checkpoint.exclude_from_loading takes."""

# Optimizer state and hyperparameters keyed by parameter FQN, not by param-group index: pipeline
# ranks hold different parameters in their "group 0", and DCP would keep only one rank's list.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelState(Stateful):
    """The model's parameters under FQNs that do not depend on the parallel layout (DTensors
    when sharded). ``dtype`` casts floating tensors on save (an export in bfloat16); ``select``
    keeps the FQNs it accepts (LoRA: the adapters, or the frozen base), None = all."""

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = None,
        select: Callable[[str], bool] | None = None,
    ) -> None:
        self.model, self.dtype, self.select = model, dtype, select

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = get_model_state_dict(self.model)  # tensors, by FQN
        if self.select is not None:
            state = {k: v for k, v in state.items() if self.select(k)}
        if self.dtype is None:
            return state
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        options = StateDictOptions(strict=self.select is None)
        set_model_state_dict(self.model, state_dict, options=options)


class OptimizerState(Stateful):
    """The optimizer's moments and hyperparameters, keyed by the parameters' FQNs."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIONS)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=_OPTIONS)


class DataState(Stateful):
    """The dataloader's position; a state it cannot take (another batch size) is a ConfigError."""

    def __init__(self, dataloader: Stateful) -> None:
        self.dataloader = dataloader

    def state_dict(self) -> dict[str, Any]:
        return self.dataloader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self.dataloader.load_state_dict(state_dict)
        except ValueError as e:
            raise CheckpointError(
                f"{e} (or pass --checkpoint.exclude_from_loading=dataloader to start the data "
                "from the beginning)"
            ) from None


def merged_view(parts: Sequence[nn.Module]) -> nn.Module:
    """A module whose children are the parts' own (shared, not copied) submodules, merged by
    name: containers present in several parts (a ``layers`` ModuleDict) merge their disjoint
    entries. Parameters stay the parts' objects, so the optimizer's state maps onto it."""
    if len(parts) == 1:
        return parts[0]
    view, merged = nn.Module(), set()
    for part in parts:
        if next(part.parameters(recurse=False), None) is not None:
            raise ValueError("model parts with parameters of their own cannot be merged")
        for name, child in part.named_children():
            existing = view._modules.get(name)
            if existing is None:
                view.add_module(name, child)
            elif existing is not child:
                if not isinstance(existing, nn.ModuleDict) or not isinstance(child, nn.ModuleDict):
                    raise ValueError(f"model parts both hold a different '{name}'")
                if name not in merged:  # a new container: the parts' own stay untouched
                    existing = nn.ModuleDict(dict(existing.items()))
                    view.add_module(name, existing)
                    merged.add(name)
                existing.update(dict(child.items()))
    return view


class TrainState(Stateful):
    """The step counter, the tokens trained on so far, the steps whose update was skipped
    (non-finite) and the RNG, so a resumed run draws the same random numbers. Every rank seeds
    its generators alike, so one copy serves all. ``cuda_rng`` is always saved (empty without
    CUDA), so every checkpoint has the same keys."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.is_available()
        cuda_rng = torch.cuda.get_rng_state() if cuda else torch.empty(0, dtype=torch.uint8)
        rng = torch.get_rng_state()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "rng": rng,
            "cuda_rng": cuda_rng,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        torch.set_rng_state(state_dict["rng"])
        cuda_rng = state_dict.get("cuda_rng")
        if cuda_rng is not None and cuda_rng.numel() > 0 and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda_rng)


class LoadableTrainState(Stateful):
    """A TrainState as DCP's load target: its ``cuda_rng`` takes the saved size (DCP loads into
    a tensor of the saved shape only), so a checkpoint written without CUDA loads on a GPU
    machine and the other way round; keys an older checkpoint lacks are not asked for."""

    def __init__(self, train_state: TrainState, metadata: Metadata) -> None:
        self.train_state, self.metadata = train_state, metadata

    def state_dict(self) -> dict[str, Any]:
        saved = self.metadata.state_dict_metadata
        state = {
            key: value
            for key, value in self.train_state.state_dict().items()
            if f"train_state.{key}" in saved
        }
        if isinstance(cuda_rng := saved.get("train_state.cuda_rng"), TensorStorageMetadata):
            state["cuda_rng"] = torch.empty(cuda_rng.size, dtype=torch.uint8)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_state.load_state_dict(state_dict)
