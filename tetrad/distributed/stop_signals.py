"""A clean stop on a signal (preemption): the handler only records the signal; after each step
every rank learns whether any rank received one, so all of them stop after the same step, save
and exit 0. A rank that is never told (a signal sent to one process only) still stops with the
others, and a signal arriving mid-collective cannot leave ranks one step apart."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType

import torch
import torch.distributed as dist


class StopSignals:
    """Installs handlers for ``names`` (e.g. SIGTERM, SIGUSR1) until ``restore``."""

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.device = device
        self.received: str | None = None
        self._previous = {
            sig: signal.signal(sig, self._record) for sig in map(signal.Signals.__getitem__, names)
        }

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> torch.Tensor:
        """1.0 if any rank received a stop signal so far, else 0.0: a collective over the world,
        left on the device so the caller reads it with its other per-step values in one sync."""
        flag = torch.tensor(float(self.received is not None), device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
