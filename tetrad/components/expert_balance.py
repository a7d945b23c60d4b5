"""The trainer's side of mixture-of-experts load balancing, for any model that reports routing
(``DecoderModel.auxiliary_loss``/``expert_loads``; a dense model reports none and this does
nothing).

Per step: after each micro-batch's forward, the model's auxiliary loss (a sum over its
sequences) joins the objective scaled by ``loss_parallel_degree / global sequences``, so that
after data-parallel gradient averaging the step minimises coef × the mean per-sequence loss
of the global batch: independent of gradient accumulation and of the dp layout, and apart from
the cross entropy's normalisation by target tokens. The expert loads are summed over the
micro-batches and the data-parallel ranks; after the optimizer step the model gets them
(the auxiliary-loss-free bias update) and the metrics get their min/max/mean and the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh

from tetrad.distributed.utils import reduce_sum
from tetrad.models.spec import DecoderModel


class ExpertBalance:
    def __init__(self, model_parts: Sequence[DecoderModel], mesh: DeviceMesh) -> None:
        """``mesh``: the ranks whose batches make up one step (data and context parallel)."""
        self.model_parts, self.mesh = model_parts, mesh
        self._loads: torch.Tensor | None = None
        self._aux_sum: torch.Tensor | None = None
        self._sequences = 0

    def after_forward(
        self, model: DecoderModel, sequences: int, scale: float
    ) -> torch.Tensor | float:
        """Record ``model``'s last forward (``sequences`` rows of this rank); returns the term
        to add to the objective before backward: the auxiliary loss × ``scale`` (0 if none)."""
        self._sequences += sequences
        if (loads := model.expert_loads()) is not None:
            self._loads = loads if self._loads is None else self._loads + loads
        if (aux := model.auxiliary_loss()) is None:
            return 0.0
        detached = aux.detach()
        self._aux_sum = detached if self._aux_sum is None else self._aux_sum + detached
        return aux * scale

    def discard(self) -> None:
        """Forget the step's records: a step that is redone (torchft did not commit it)."""
        self._loads, self._aux_sum, self._sequences = None, None, 0

    def end_step(self, *, update: bool) -> dict[str, float]:
        """Sum the step's loads and loss over the ranks; with ``update`` (the optimizer stepped)
        hand the loads to each model part. Returns the step's figures for metrics.jsonl:
        ``aux_loss`` (the term added to the loss, per sequence) and tokens per expert over
        all MoE layers ``expert_load_min``/``_max``/``_mean``; empty for a dense model."""
        loads, aux, sequences = self._loads, self._aux_sum, self._sequences
        self.discard()
        if loads is None:
            return {}
        loads = reduce_sum(loads, self.mesh)
        if update:
            for part in self.model_parts:
                part.update_after_step(loads)
        figures = [loads.min(), loads.max(), loads.mean()]
        if aux is not None:
            figures.append(reduce_sum(aux, self.mesh) / (sequences * self.mesh.size()))
        values = torch.stack(figures).tolist()
        names = ["expert_load_min", "expert_load_max", "expert_load_mean", "aux_loss"]
        return dict(zip(names, values, strict=False))
