"""DCP loads that run no code from the checkpoint.

DCP's default load planner reads every non-tensor value of a checkpoint (the train state, the
schedulers', the dataloader's, the optimizer's hyperparameters) with
``torch.load(weights_only=False)``: a checkpoint from anywhere could run code on load. This
planner reads them with ``weights_only=True`` (plain values, containers and tensors only), and
refuses anything else with a one-line CheckpointError.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import ReadItem

from tetrad.errors import CheckpointError


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor values load with ``weights_only=True``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            raise CheckpointError(
                f"{self.path}: {fqn!r} holds a pickled object other than plain values"
                f"{f' ({found[1]})' if found else ''}; tetrad runs no code from checkpoints, "
                "so it cannot load it"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def safe_load(state_dict: dict[Any, Any], path: Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` of ``path`` into ``state_dict`` through ``SafeLoadPlanner``; its
    CheckpointError comes out as itself, not wrapped in DCP's CheckpointException."""
    try:
        dcp.load(
            state_dict, checkpoint_id=str(path), planner=SafeLoadPlanner(path), no_dist=no_dist
        )
    except CheckpointException as e:
        refused = [err for err, _ in e.failures.values() if isinstance(err, CheckpointError)]
        if refused:
            raise refused[0] from None
        raise
