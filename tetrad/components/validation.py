"""Validation: the mean token loss on held-out batches, every few steps.

Every evaluation reads the same batches from the start of the validation source, a global batch
(``local_batch_size`` × dp × gradient-accumulation sequences) at a time, and each dp rank
evaluates its rows of it, a micro-batch at a time: the validation set depends on the global
batch only, not on the layout, so runs that differ only in their parallelism report the same
``val_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch.distributed.device_mesh import DeviceMesh

from tetrad.config.job_config import ValidationConfig
from tetrad.data import Batch
from tetrad.distributed.utils import reduce_sum

LossSum = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]
"""A batch → this rank's summed token loss and its number of target tokens (on the device)."""


def _rows(tensor: torch.Tensor, *, rows: slice) -> torch.Tensor:
    return tensor[rows]


class Validator:
    def __init__(
        self,
        config: ValidationConfig,
        build_loader: Callable[[], Iterable[Batch]],
        *,
        dp_rank: int,
        local_batch_size: int,
        micro_batches: int,
        loss_mesh: DeviceMesh,
        device: torch.device,
    ) -> None:
        self.config = config
        self.build_loader = build_loader
        rows = local_batch_size * micro_batches
        self.micro_batches = [
            slice(start, start + local_batch_size)
            for start in range(dp_rank * rows, (dp_rank + 1) * rows, local_batch_size)
        ]  # this rank's rows of a global batch
        self.loss_mesh, self.device = loss_mesh, device

    def due(self, step: int, last_step: int) -> bool:
        return step % self.config.freq == 0 or step == last_step

    @torch.no_grad()
    def evaluate(self, loss_sum: LossSum) -> dict[str, float]:
        """``val_loss`` (mean over every target token of every dp rank's rows) and
        ``val_perplexity`` over the first ``steps`` global batches of a fresh loader."""
        total = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        batches = iter(self.build_loader())
        for _ in range(self.config.steps):
            batch = next(batches)
            for rows in self.micro_batches:
                batch_loss, batch_tokens = loss_sum(batch.map(partial(_rows, rows=rows)))
                total += batch_loss
                tokens += batch_tokens
        loss = float(reduce_sum(total, self.loss_mesh) / reduce_sum(tokens, self.loss_mesh))
        return {"val_loss": loss, "val_perplexity": math.exp(loss)}
