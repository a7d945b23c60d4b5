"""Pipeline schedules' costs by formula: the bubble and the micro-batches' activations the
busiest rank holds, for the planner's step time and memory and the estimator's pipeline ranks.
Each formula cites its source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tetrad.config.job_config import PipelineScheduleName


@dataclass(frozen=True)
class Schedule:
    """A pipeline schedule's cost on ``p`` ranks with ``m`` micro-batches, at stages_per_rank
    ``v``, with a micro-batch's forward, input-gradient and weight-gradient passes taking
    equal time (the zero-bubble papers' assumption)."""

    stages_per_rank: int
    bubble: Callable[[int, int], float]
    """Idle time over compute time (the bubble fraction of Narayanan et al. 2021, §2.2)."""
    in_flight: Callable[[int, int], float]
    """Micro-batches' activations of the rank's blocks that the busiest rank holds at once."""


def _interleaved_memory(p: int, m: int) -> float:
    # Korthikanti et al. 2022 ("Reducing Activation Recomputation"), §4.2.3: the first rank
    # of the interleaved schedule holds 1 + (p - 1) / (p·v) times 1F1B's p micro-batches.
    return min(p, m) * (1 + (p - 1) / (2 * p))


def _zero_bubble_v(p: int, m: int) -> float:
    # Qi et al. 2024 ("Zero Bubble Pipeline Parallelism", §4): ZB-V fills the bubble once
    # there are 2p micro-batches; with fewer, ZB-H1's third of the interleaved bubble.
    return 0.0 if m >= 2 * p else (p - 1) / (3 * 2 * m)


SCHEDULES: dict[PipelineScheduleName, Schedule] = {
    # GPipe (Huang et al. 2019): every forward before any backward, all m in flight.
    "GPipe": Schedule(1, lambda p, m: (p - 1) / m, lambda p, m: m),
    # 1F1B / PipeDream-Flush (Narayanan et al. 2021): the first rank holds p in flight.
    "1F1B": Schedule(1, lambda p, m: (p - 1) / m, lambda p, m: min(p, m)),
    # Interleaved 1F1B (same paper): v = 2 stages per rank divide the bubble by v.
    "Interleaved1F1B": Schedule(2, lambda p, m: (p - 1) / (2 * m), _interleaved_memory),
    # Breadth-first looping (Lamy-Poirier 2023): the interleaved bubble, but all m micro-
    # batches' forwards run before the backwards, as in GPipe.
    "LoopedBFS": Schedule(2, lambda p, m: (p - 1) / (2 * m), lambda p, m: m),
    # ZB-H1 interleaved (Qi et al. 2024, §3): deferring weight gradients leaves a third of
    # the bubble, at the interleaved schedule's memory.
    "InterleavedZeroBubble": Schedule(2, lambda p, m: (p - 1) / (3 * 2 * m), _interleaved_memory),
    # ZB-V (Qi et al. 2024, §4): 1F1B's peak activation memory, p micro-batches.
    "ZBVZeroBubble": Schedule(2, _zero_bubble_v, lambda p, m: min(p, m)),
    # DualPipeV (DeepSeek-V3 report, Table 2: p + 1 micro-batches in flight); its bubble is
    # taken as ZB-V's (computation-communication overlap is not modelled).
    "DualPipeV": Schedule(2, _zero_bubble_v, lambda p, m: p + 1),
}
