"""The trainer's side of mixture-of-experts load balancing, for any model that reports routing
(``DecoderModel.auxiliary_loss``/``expert_loads``; a dense model reports none and this does
nothing).

A forward hook on each model part records, per real forward (activation checkpointing
recomputes blocks, not the part), the part's expert loads and auxiliary loss (a sum over its
sequences). The loss joins the objective inside the part's own backward: the hook returns the
part's output through ``_AuxiliaryGradient``, the identity whose backward also sends
``loss_parallel_degree / global sequences`` into the auxiliary loss, so that after
data-parallel gradient averaging the step minimises coef × the mean per-sequence loss of the
global batch, whatever the micro-batching, the dp layout or the pipeline schedule (which runs
each stage's forward and backward itself). The expert loads are summed over the micro-batches
and the data-parallel ranks; after the optimizer step each part gets its own layers' loads
(the auxiliary-loss-free bias update) and the metrics get the whole model's min/max/mean and
loss, combined over the pipeline stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from tetrad.distributed.pipeline import inferring_metadata
from tetrad.distributed.utils import reduce_sum
from tetrad.models.spec import DecoderModel


class _AuxiliaryGradient(torch.autograd.Function):
    """``output`` unchanged; backward passes its gradient on and sends ``scale`` into ``aux``."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.aux = (aux.shape, aux.dtype, aux.device)
        ctx.scale = scale
        # Not a view (the zero-bubble schedules detach_ a stage's output in place), no copy.
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        shape, dtype, device = ctx.aux
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


class ExpertBalance:
    def __init__(
        self,
        model_parts: Sequence[DecoderModel],
        mesh: DeviceMesh,
        pp_mesh: DeviceMesh,
        device: torch.device,
    ) -> None:
        """``mesh``: the ranks whose batches make up one step (data and context parallel);
        ``pp_mesh``: the ranks holding the other pipeline stages of this rank's model."""
        self.model_parts, self.mesh, self.pp_mesh, self.device = model_parts, mesh, pp_mesh, device
        self._loads: list[torch.Tensor | None] = [None] * len(model_parts)
        self._aux_sum: torch.Tensor | None = None
        self._sequences = 0
        self._aux_scale: float | None = None
        self._routed: bool | None = None  # whether any stage routes: learnt at the first step
        for i, part in enumerate(model_parts):
            part.register_forward_hook(self._hook(i))

    def begin_step(self, sequences: int, aux_scale: float) -> None:
        """A step over ``sequences`` rows of this rank starts: until ``end_step``, record the
        parts' forwards and send ``aux_scale`` into their auxiliary losses' gradients."""
        self._sequences, self._aux_scale = sequences, aux_scale

    def _hook(self, index: int) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor | None]:
        def after_forward(part: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor | None:
            # Not in a step, forward only (validation), or no real forward.
            if self._aux_scale is None or not torch.is_grad_enabled() or inferring_metadata():
                return None
            model = self.model_parts[index]
            if (loads := model.expert_loads()) is not None:
                so_far = self._loads[index]
                self._loads[index] = loads if so_far is None else so_far + loads
            if (aux := model.auxiliary_loss()) is None:
                return None
            detached = aux.detach()
            self._aux_sum = detached if self._aux_sum is None else self._aux_sum + detached
            wrapped = _AuxiliaryGradient.apply(output, aux, self._aux_scale)  # type: ignore[no-untyped-call]  # torch leaves Function.apply untyped
            return cast(torch.Tensor, wrapped)

        return after_forward

    def discard(self) -> None:
        """Forget the step's records: a step that is redone (torchft did not commit it)."""
        self._loads = [None] * len(self.model_parts)
        self._aux_sum, self._sequences, self._aux_scale = None, 0, None

    def end_step(self, *, update: bool) -> dict[str, float]:
        """Sum the step's loads and loss over the data-parallel ranks; with ``update`` (the
        optimizer stepped) hand each model part its own layers' loads. Returns the whole
        model's figures for metrics.jsonl, combined over the pipeline stages: ``aux_loss``
        (the term added to the loss, per sequence) and tokens per expert over all MoE layers
        ``expert_load_min``/``_max``/``_mean``; empty for a dense model."""
        loads, aux, sequences = self._loads, self._aux_sum, self._sequences
        self.discard()
        held = [(part, x) for part, x in zip(self.model_parts, loads, strict=True) if x is not None]
        if not self._any_stage_routes(bool(held)):
            return {}
        # One reduction over the data-parallel ranks for every part's loads and the loss.
        pieces = [x.flatten() for _, x in held]
        pieces.append(torch.zeros(1, device=self.device) if aux is None else aux.reshape(1))
        summed = reduce_sum(torch.cat(pieces), self.mesh).split([len(p) for p in pieces])
        part_loads = [s.view_as(x) for s, (_, x) in zip(summed[:-1], held, strict=True)]
        if update:
            for (part, _), part_load in zip(held, part_loads, strict=True):
                part.update_after_step(part_load)
        flat = torch.cat([*summed[:-1], torch.empty(0, device=self.device)])
        inf = torch.tensor(float("inf"), device=self.device)
        lowest, highest = (flat.min(), flat.max()) if held else (inf, -inf)
        count = torch.tensor(float(flat.numel()), device=self.device)
        has_aux = torch.tensor(float(aux is not None), device=self.device)
        stats = torch.stack([-lowest, highest, flat.sum(), count, summed[-1][0], has_aux])
        if self.pp_mesh.size() > 1:  # each stage holds some of the layers: combine them
            stages = [torch.empty_like(stats) for _ in range(self.pp_mesh.size())]
            dist.all_gather(stages, stats, group=self.pp_mesh.get_group())
            every = torch.stack(stages)
            stats = torch.cat([every[:, :2].amax(0), every[:, 2:].sum(0)])
        per_sequence = stats[4] / (sequences * self.mesh.size())
        figures = torch.stack([-stats[0], stats[1], stats[2] / stats[3], per_sequence, stats[5]])
        *values, any_aux = figures.tolist()
        names = ["expert_load_min", "expert_load_max", "expert_load_mean", "aux_loss"]
        return dict(zip(names, values if any_aux else values[:3], strict=False))

    def _any_stage_routes(self, here: bool) -> bool:
        """Whether the model routes at all, decided at the first step: a pipeline stage may
        hold no MoE layer while the others do (then it still joins the stages' figures)."""
        if self._routed is None:
            flag = torch.tensor(float(here), device=self.device)
            if self.pp_mesh.size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pp_mesh.get_group())
            self._routed = bool(flag.item())
        return self._routed
