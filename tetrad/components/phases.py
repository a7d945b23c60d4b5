"""The phase timeline: where each rank's time goes, step by step, as JSON lines.

``<dump_folder>/logs/phases_rank<R>.jsonl`` gets one event per phase of a step,
``{"rank", "step", "phase", "start" (unix time), "duration_s"}``: data_wait, forward_backward,
optimizer, validation, checkpoint_save, checkpoint_load (at the step it resumed from),
profiler (its own work after each step with --profiling.enable: starting, stopping, writing a
trace), memory_snapshot (the steps that write one), gc (the steps that collect).
These top-level phases do not overlap; what they leave of a step's wall time is the loop's own
bookkeeping (metrics, logging). ``compile`` events (torch.compile's Dynamo and lazy backward
compilations) lie inside the phase that triggered them, which ``within`` names.

Phases are timed on the host, with no synchronisation of their own: a device sync per phase
would stall the GPU's queue several times a step and cost throughput. So on a GPU a phase lasts
until the host has *issued* its work, and the GPU's time shows where the host waits for it: the
one host sync of a step, the read of its loss and gradient norm, ends ``forward_backward``,
which therefore holds the GPU's forward, backward, gradient reduction and clipping (plus any of
the previous step's optimizer kernels still queued); ``optimizer`` holds the launch of the
update. On a CPU every phase is its true duration. The phases of a step sum to its wall time
(less the bookkeeping) on either.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple


class Stamp(NamedTuple):
    """A moment on both clocks: ``unix`` for the event's start, ``perf`` for its duration."""

    unix: float
    perf: float


@dataclass
class Timed:
    """What ``PhaseTimeline.phase`` yields: the phase's duration once it has ended."""

    seconds: float = 0.0


class PhaseTimeline:
    """This rank's phase events, written a step at a time: a step's events go to the file when
    the next step's first event arrives (and at ``close``), so a refused start, which records
    nothing past its checkpoint load, writes nothing."""

    def __init__(self, path: Path, rank: int, *, watch_compile: bool = False) -> None:
        self.path, self.rank = path, rank
        self._file: IO[str] | None = None
        self._pending: list[dict[str, Any]] = []
        self._totals: defaultdict[str, float] = defaultdict(float)
        self._step = 0
        self._open_phase: str | None = None  # where a compilation happens
        self._compile_began: Stamp | None = None
        self._callbacks: tuple[Any, Any] | None = None
        if watch_compile:
            self._watch_compile()

    @staticmethod
    def clock() -> Stamp:
        return Stamp(time.time(), time.perf_counter())

    def record(self, phase: str, step: int, began: Stamp, *, within: str | None = None) -> float:
        """One event, from ``began`` until now; returns its duration in seconds."""
        seconds = time.perf_counter() - began.perf
        if self._pending and self._pending[-1]["step"] != step:
            self.flush()
        event = {"rank": self.rank, "step": step, "phase": phase}
        event |= {"start": round(began.unix, 6), "duration_s": round(seconds, 6)}
        if within is not None:
            event["within"] = within
        else:
            self._totals[phase] += seconds
        self._pending.append(event)
        return seconds

    @contextlib.contextmanager
    def phase(self, name: str, step: int) -> Iterator[Timed]:
        """Time the block as phase ``name`` of ``step``."""
        timed, began = Timed(), self.clock()
        self._step, self._open_phase = step, name
        try:
            yield timed
        finally:
            self._open_phase = None
            timed.seconds = self.record(name, step, began)

    def take(self, phase: str) -> float:
        """Seconds spent in ``phase`` since the last ``take`` of it (the metrics' interval)."""
        return self._totals.pop(phase, 0.0)

    def flush(self) -> None:
        if not self._pending:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        self._file.write("".join(json.dumps(event) + "\n" for event in self._pending))
        self._file.flush()
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._callbacks is not None:
            from torch._dynamo.callback import callback_handler

            callback_handler.remove_start_callback(self._callbacks[0])
            callback_handler.remove_end_callback(self._callbacks[1])
            self._callbacks = None

    def _watch_compile(self) -> None:
        """Dynamo's compile callbacks mark each compilation (a new frame, or a backward that
        AOTAutograd compiles lazily) as a ``compile`` event inside the phase that ran it."""
        from torch._dynamo.callback import CallbackArgs, callback_handler

        def started(args: CallbackArgs) -> None:
            self._compile_began = self.clock()

        def ended(args: CallbackArgs) -> None:
            if self._compile_began is not None:
                within = self._open_phase or "startup"
                self.record("compile", self._step, self._compile_began, within=within)
                self._compile_began = None

        callback_handler.register_start_callback(started)
        callback_handler.register_end_callback(ended)
        self._callbacks = (started, ended)
