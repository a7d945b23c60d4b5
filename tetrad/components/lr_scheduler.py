"""Warmup-stable-decay learning rate: linear warmup, a constant plateau, then a decay to a floor.

WSD (Hu et al., 2024, MiniCPM) keeps the peak LR for most of the run so a run can be extended
or stopped early and cooled down; with decay_ratio=None it is the classic warmup + full decay.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from tetrad.config.job_config import LRSchedulerConfig

logger = logging.getLogger(__name__)


def wsd_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    decay_ratio: float | None,
    decay_type: str,
    min_lr_factor: float,
) -> float:
    """LR multiplier for the optimizer step with 0-based index ``step``.

    Warmup reaches the peak at its last step; the decay reaches ``min_lr_factor`` at the last
    step of the run.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    after_warmup = total_steps - warmup_steps
    decay_steps = (
        after_warmup if decay_ratio is None else min(after_warmup, round(decay_ratio * total_steps))
    )
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    if decay_steps == 0:  # all warmup (LambdaLR still asks for the step after the last)
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    if decay_type == "linear":
        curve = 1.0 - progress
    elif decay_type == "cosine":
        curve = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay_type == "sqrt":
        curve = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"unknown decay_type {decay_type!r}")
    return min_lr_factor + (1.0 - min_lr_factor) * curve


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: LRSchedulerConfig, total_steps: int
) -> LambdaLR:
    """A LambdaLR (so its state is Stateful) following :func:`wsd_factor`. The default warmup
    is shortened to a shorter schedule, and says so (validate_config refuses a chosen one)."""
    warmup_steps = min(config.warmup_steps, total_steps)
    if warmup_steps < config.warmup_steps:
        logger.info(
            "--lr_scheduler.warmup_steps: the default %d is longer than the %d-step schedule; "
            "warming up over %d steps",
            config.warmup_steps, total_steps, warmup_steps,
        )  # fmt: skip
    factor = functools.partial(
        wsd_factor,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay_ratio=config.decay_ratio,
        decay_type=config.decay_type,
        min_lr_factor=config.min_lr_factor,
    )
    return LambdaLR(optimizer, factor)


def follow_current_schedule(scheduler: LambdaLR, base_lrs: list[float]) -> list[str]:
    """After a resume loaded ``scheduler``'s state (its step count and the peak LRs of the run
    that saved it): this run's peak LRs ``base_lrs`` and schedule decide the LR of its first
    step, so a changed --optimizer.lr, or a run extended past its old end (whose LR had decayed
    to the floor), takes effect at once. Returns what changed, to be logged."""
    # Every param group follows the one schedule; how many groups there are follows the layout
    # (one per kind of tensor: ``group_by_tensor_kind``), so a resharded resume may differ.
    saved, peak = float(scheduler.base_lrs[0]), base_lrs[0]
    changes = [f"peak lr {saved:g} → {peak:g}"] if saved != peak else []
    step = scheduler.last_epoch
    lrs: list[float | torch.Tensor] = [
        base * fn(step) for base, fn in zip(base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    last = float(scheduler.get_last_lr()[0])
    if not math.isclose(last, float(lrs[0])):
        changes.append(f"lr of step {step + 1} {last:.3g} → {float(lrs[0]):.3g}")
    peaks: list[float | torch.Tensor] = list(base_lrs)
    scheduler.base_lrs = peaks
    scheduler._last_lr = lrs  # what get_last_lr() reports
    for group, base, lr in zip(scheduler.optimizer.param_groups, base_lrs, lrs, strict=True):
        group["initial_lr"], group["lr"] = base, lr
    return changes
