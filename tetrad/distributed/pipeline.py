"""Pipeline parallelism: split a meta-built model into stages by blocks and run them with a
``torch.distributed.pipelining`` schedule over the ``pp`` mesh.

Each stage is a deep copy of the whole (meta) model with the blocks, embeddings, final norm and
output projection it does not own deleted, so every parameter keeps its full-model FQN: one
checkpoint layout for every pipeline layout, and the full-replica initialisation still applies.
The model contract: blocks live in a ``layers`` ModuleDict; the first stage alone keeps the
modules named in ``first``, the last alone those in ``last``; a stage without them takes and/or
returns hidden states.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class
from torch.distributed.tensor import DTensor

from tetrad.config import Config, ConfigError
from tetrad.config.job_config import V_SCHEDULES

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

SINGLE_STAGE_SCHEDULES = frozenset({"GPipe", "1F1B"})
MICROBATCHES_AT_LEAST_STAGES = frozenset({"1F1B", "DualPipeV"})


@dataclass(frozen=True)
class PipelinePlan:
    """Which blocks each stage owns, which stages this rank runs, and how many micro-batches."""

    schedule: str
    num_stages: int
    stage_layers: list[list[str]]
    """Block names (keys of ``layers``) per stage, over all ranks."""
    local_stages: list[int]
    """The stages this rank runs, in the order the schedule expects."""
    microbatches: int


def plan_pipeline(config: Config, layer_names: Sequence[str], pp_rank: int) -> PipelinePlan:
    """Validate the pipeline options against the model and batch; fail with one line each."""
    p, pp = config.parallelism, config.parallelism.pp
    schedule, n_layers = p.pp_schedule, len(layer_names)
    per_rank = "1 per rank" if schedule in SINGLE_STAGE_SCHEDULES else "2 per rank"
    valid: Callable[[int], bool]
    if schedule in SINGLE_STAGE_SCHEDULES:
        default_stages, valid = pp, (lambda s: s == pp)
        need = f"exactly pp = {pp} stages"
    elif schedule in V_SCHEDULES:
        default_stages, valid = 2 * pp, (lambda s: s == 2 * pp)
        need = f"exactly 2 × pp = {2 * pp} stages"
    else:
        default_stages, valid = 2 * pp, (lambda s: s % pp == 0 and s >= 2 * pp)
        need = f"a multiple of pp = {pp} stages, at least {2 * pp}"
    if p.pp_layers_per_stage is None:
        num_stages = default_stages
        if n_layers % num_stages:
            raise ConfigError(
                f"{n_layers} layers do not split evenly into {num_stages} pipeline stages "
                f"({schedule}: {per_rank} × pp {pp}); set --parallelism.pp_layers_per_stage"
            )
        size = n_layers // num_stages
    else:
        size = p.pp_layers_per_stage
        num_stages = math.ceil(n_layers / size)
        if not valid(num_stages):
            raise ConfigError(
                f"--parallelism.pp_layers_per_stage {size} makes {num_stages} stages of "
                f"{n_layers} layers, but {schedule} on pp {pp} needs {need}"
            )
    stage_layers = [list(layer_names[i : i + size]) for i in range(0, n_layers, size)]

    microbatches = num_stages if p.pp_microbatches == -1 else p.pp_microbatches
    local_batch = config.training.local_batch_size
    if local_batch % microbatches:
        raise ConfigError(
            f"--training.local_batch_size {local_batch} is not divisible by "
            f"{microbatches} pipeline micro-batches (--parallelism.pp_microbatches)"
        )
    if schedule in MICROBATCHES_AT_LEAST_STAGES and microbatches < num_stages:
        raise ConfigError(
            f"{schedule} needs at least as many micro-batches as stages: "
            f"--parallelism.pp_microbatches {microbatches} < {num_stages} stages"
        )
    if schedule in V_SCHEDULES:
        local = [pp_rank, num_stages - 1 - pp_rank]
    else:
        local = list(range(pp_rank, num_stages, pp))
    return PipelinePlan(schedule, num_stages, stage_layers, local, microbatches)


def split_model(
    model: M,
    plan: PipelinePlan,
    *,
    first: Sequence[str] = ("tok_embeddings",),
    last: Sequence[str] = ("norm", "output"),
) -> list[M]:
    """One deep copy of the (meta) model per local stage, keeping only what that stage owns."""
    first_params = {id(p) for name in first for p in _params(model, name)}
    if any(id(p) in first_params for name in last for p in _params(model, name)):
        raise ConfigError(
            "tied input and output embeddings cannot be split across pipeline stages; "
            "use a flavor without tie_embeddings or --parallelism.pp=1"
        )
    parts = []
    for stage in plan.local_stages:
        part = copy.deepcopy(model)
        keep = set(plan.stage_layers[stage])
        layers = part.get_submodule("layers")
        assert isinstance(layers, nn.ModuleDict), "the model contract: blocks in a ModuleDict"
        for name in list(layers.keys()):
            if name not in keep:
                del layers[name]
        if stage != 0:
            for name in first:
                setattr(part, name, None)
        if stage != plan.num_stages - 1:
            for name in last:
                setattr(part, name, None)
        parts.append(part)
    return parts


def _params(model: nn.Module, name: str) -> list[nn.Parameter]:
    module = getattr(model, name, None)
    return list(module.parameters()) if module is not None else []


_inferring_metadata = False


def inferring_metadata() -> bool:
    """Whether a stage is running torch's metadata inference: on the first step (train or
    eval) each stage runs the first micro-batch's forward (and backward) once more, on
    stand-in inputs, to learn its shapes. Records kept per real forward (an MoE's expert
    loads and balance loss) skip it."""
    return _inferring_metadata


class _Stage(PipelineStage):
    """``PipelineStage`` whose metadata inference ``inferring_metadata`` reports."""

    def _compute_outputs(
        self, *args: torch.Tensor, module: nn.Module, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | None:
        global _inferring_metadata
        _inferring_metadata = True
        try:
            return super()._compute_outputs(*args, module=module, **kwargs)
        finally:
            _inferring_metadata = False


class Pipeline:
    """This rank's stages and the schedule that runs them."""

    def __init__(
        self,
        parts: Sequence[nn.Module],
        plan: PipelinePlan,
        pp_mesh: DeviceMesh,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        group = pp_mesh.get_group()
        stages = [
            _Stage(part, stage, plan.num_stages, device, group=group)
            for part, stage in zip(parts, plan.local_stages, strict=True)
        ]
        self.has_first = 0 in plan.local_stages
        self.has_last = plan.num_stages - 1 in plan.local_stages
        cls = get_schedule_class(plan.schedule)
        single = issubclass(cls, PipelineScheduleSingle)
        try:
            # The loss is already normalised by the global token count: no per-micro-batch
            # averaging on top (scale_grads=False).
            self.schedule = cls(
                stages[0] if single else stages,
                n_microbatches=plan.microbatches,
                loss_fn=loss_fn,
                scale_grads=False,
            )
        except ValueError as e:
            raise ConfigError(f"--parallelism.pp_schedule {plan.schedule}: {e}") from None
        logger.info(
            "pipeline %s: %d stages, this rank runs %s (blocks %s), %d micro-batches",
            plan.schedule, plan.num_stages, plan.local_stages,
            [plan.stage_layers[s] for s in plan.local_stages], plan.microbatches,
        )  # fmt: skip

    def step(
        self, inputs: torch.Tensor, labels: torch.Tensor, kwargs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Forward and backward one local batch through every stage; return the sum of the
        micro-batch losses on the rank that runs the last stage (zero elsewhere).
        ``kwargs`` (positions, document ids: [B, ...]) reach every stage's forward (keyword
        arguments are split into micro-batches like the inputs, and passed to all stages)."""
        losses: list[torch.Tensor] = []
        target = labels if self.has_last else None
        args = (inputs,) if self.has_first else ()
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        return _sum(losses, inputs.device)

    def evaluate(
        self, inputs: torch.Tensor, labels: torch.Tensor, kwargs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Like ``step``, forward only (the schedule's eval pass): no gradients."""
        losses: list[torch.Tensor] = []
        target = labels if self.has_last else None
        args = (inputs,) if self.has_first else ()
        self.schedule.eval(*args, target=target, losses=losses, **kwargs)
        return _sum(losses, inputs.device)


def _sum(losses: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the micro-batch losses (zero on a rank without the last stage)."""
    if not losses:
        return torch.zeros((), device=device)
    losses = [loss.full_tensor() if isinstance(loss, DTensor) else loss for loss in losses]
    return torch.stack([loss.detach() for loss in losses]).sum()
