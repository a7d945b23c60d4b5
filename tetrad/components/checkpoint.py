"""DCP checkpoints of everything a run needs to continue exactly: model, optimizer, LR schedule,
data position, step and RNG.

Each rank writes its own shards (``torch.distributed.checkpoint``); a checkpoint is written
under a temporary name and renamed to ``step-N`` only once every rank has finished, so a folder
named ``step-N`` is always complete.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from tetrad.config.job_config import CheckpointConfig

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Optimizer state and hyperparameters keyed by parameter FQN, not by param-group index: pipeline
# ranks hold different parameters in their "group 0", and DCP would keep only one rank's list.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelAndOptimizer(Stateful):
    """Model and optimizer state with FQN keys that do not depend on the parallel layout.

    Pipeline stages are copies of the full model with parts deleted; a view that shares their
    modules gives one state dict under the full model's FQNs for all of this rank's stages.
    """

    def __init__(self, model_parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.model = model_parts[0] if len(model_parts) == 1 else merged_view(model_parts)
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=_OPTIONS)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optimizer"],
            options=_OPTIONS,
        )


def merged_view(parts: list[nn.Module]) -> nn.Module:
    """A module whose children are the parts' own (shared, not copied) submodules, merged by
    name: containers present in several parts (a ``layers`` ModuleDict) merge their disjoint
    entries. Parameters stay the parts' objects, so the optimizer's state maps onto it."""
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
                    existing = nn.ModuleDict(existing)
                    view.add_module(name, existing)
                    merged.add(name)
                existing.update(child)
    return view


class TrainState(Stateful):
    """The step counter and the RNG, so a resumed run draws the same random numbers."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rng": torch.get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        torch.set_rng_state(state_dict["rng"])


class CheckpointManager:
    def __init__(
        self, config: CheckpointConfig, folder: Path, states: dict[str, Stateful], total_steps: int
    ) -> None:
        self.config = config
        self.folder = folder
        self.states = states
        self.total_steps = total_steps

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (``.tmp`` folders are never complete)."""
        if not self.folder.is_dir():
            return None
        steps = [int(m[1]) for p in self.folder.iterdir() if (m := _STEP_DIR.match(p.name))]
        return max(steps, default=None)

    def load_latest(self) -> int | None:
        """Restore every state from the newest checkpoint; return its step (None: none found)."""
        if not self.config.enable or (step := self.latest_step()) is None:
            return None
        start = time.perf_counter()
        dcp.load(self.states, checkpoint_id=str(self.folder / f"step-{step}"))
        logger.info(
            "resumed from %s in %.1f s",
            self.folder / f"step-{step}",
            time.perf_counter() - start,
        )
        return step

    def maybe_save(self, step: int) -> None:
        if not self.config.enable:
            return
        if step % self.config.interval and step != self.total_steps:
            return
        final, tmp = self.folder / f"step-{step}", self.folder / f"step-{step}.tmp"
        start = time.perf_counter()
        dcp.save(self.states, checkpoint_id=str(tmp))
        dist.barrier()  # every rank's shards are on disk
        if dist.get_rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        dist.barrier()
        logger.info("saved %s in %.1f s", final, time.perf_counter() - start)
