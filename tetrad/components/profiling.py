"""Looking inside a run, stepped once per training step (``Profiling``): torch.profiler traces
of windows of steps, CUDA allocator snapshots, and Python garbage collection at fixed steps.

Everything here is per rank and takes no collective, so it works alike under every
parallelism; each rank writes its own files, named by its global rank.
"""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from tetrad.components.phases import PhaseTimeline
from tetrad.config.job_config import ProfilingConfig

logger = logging.getLogger(__name__)

ScheduledAction = Literal[
    ProfilerAction.NONE,
    ProfilerAction.WARMUP,
    ProfilerAction.RECORD,
    ProfilerAction.RECORD_AND_SAVE,
]
"""What a profiler schedule returns (DEVICE_STOPPED is the profiler's own)."""


class TraceWindows:
    """torch.profiler over windows of ``freq`` steps: in each, the last ``active_steps`` are
    recorded after ``warmup_steps`` that the profiler runs and discards (its first-step costs),
    and the trace is written as ``<folder>/step-N/rank<R>.json``, N the window's last step,
    a multiple of ``freq`` (also after a resume). The profiler counts training steps, so its
    ``ProfilerStep#N`` spans are the run's steps."""

    def __init__(
        self, config: ProfilingConfig, folder: Path, rank: int, *, cuda: bool, profile_memory: bool
    ) -> None:
        self.config, self.folder, self.rank = config, folder, rank
        self.started = False
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=self.action,
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=profile_memory,
        )

    def action(self, step: int) -> ScheduledAction:
        """What the profiler does during training step ``step``."""
        c = self.config
        position = (step - 1) % c.freq + 1  # 1 .. freq within its window
        if position <= c.freq - c.warmup_steps - c.active_steps:
            return ProfilerAction.NONE
        if position <= c.freq - c.active_steps:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD_AND_SAVE if position == c.freq else ProfilerAction.RECORD

    def start(self, first_step: int) -> None:
        # The profiler numbers steps from 0; from here on it numbers the run's.
        self.profiler.step_num = first_step
        self.profiler.current_action = self.action(first_step)
        self.profiler.start()
        self.started = True

    def step(self) -> None:
        """After each training step; writes the trace at a window's end."""
        with warnings.catch_warnings():  # a trace per window is the point, not a surprise
            warnings.filterwarnings("ignore", message=".*Profiler clears events at the end")
            self.profiler.step()

    def stop(self) -> None:
        """Stop profiling; a window cut short by the run's end is written as far as it went."""
        self.profiler.stop()
        self.started = False

    def _write(self, profiler: torch.profiler.profile) -> None:
        last = profiler.step_num - 1  # the profiler has moved on to the next step
        path = self.folder / f"step-{last}" / f"rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(path))
        logger.info("profiler trace up to step %d: %s", last, path)


class MemorySnapshots:
    """The CUDA caching allocator's history of allocations, with stack traces, written as a
    snapshot (``<folder>/step-N/rank<R>.pickle``, viewable at pytorch.org/memory_viz) every
    ``freq`` steps and when the run runs out of memory. Recording starts when the object is
    built, before the model is, so the parameters' allocations are in it too."""

    def __init__(self, folder: Path, rank: int, freq: int) -> None:
        self.folder, self.rank, self.freq = folder, rank, freq
        torch.cuda.memory._record_memory_history(max_entries=100_000)

    def due(self, step: int) -> bool:
        return step % self.freq == 0

    def dump(self, name: str) -> Path:
        path = self.folder / name / f"rank{self.rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        logger.info("memory snapshot: %s", path)
        return path

    def stop(self) -> None:
        torch.cuda.memory._record_memory_history(enabled=None)


class Profiling:
    """What the trainer steps once per training step: profiler windows, memory snapshots and
    Python GC (``--training.gc_freq``: automatic collection off, a generation-1 collection every
    gc_freq steps on every rank at once, so no rank stalls the others at a random moment), each
    a phase of the timeline on the steps where it works."""

    def __init__(
        self,
        config: ProfilingConfig,
        *,
        gc_freq: int,
        dump_folder: Path,
        rank: int,
        device: torch.device,
        phases: PhaseTimeline,
    ) -> None:
        self.gc_freq, self.phases = gc_freq, phases
        cuda = device.type == "cuda"
        self.memory = None
        if config.enable_memory_snapshot and cuda:
            self.memory = MemorySnapshots(
                dump_folder / "memory_snapshot", rank, config.memory_snapshot_freq
            )
        elif config.enable_memory_snapshot:
            logger.info(
                "--profiling.enable_memory_snapshot: allocator snapshots are CUDA-only; on %s the "
                "profiler traces hold the memory view instead (profile_memory=True)%s",
                device.type, "" if config.enable else "; add --profiling.enable to record them",
            )  # fmt: skip
        self.traces = None
        if config.enable:
            self.traces = TraceWindows(
                config,
                dump_folder / "profile_traces",
                rank,
                cuda=cuda,
                profile_memory=config.enable_memory_snapshot and not cuda,
            )
        self._gc_was_enabled: bool | None = None

    def start(self, first_step: int) -> None:
        """Before the first training step of this start, ``first_step``."""
        if self.traces is not None:
            self.traces.start(first_step)
        if self.gc_freq > 0:
            self._gc_was_enabled = gc.isenabled()
            gc.disable()

    def step(self, step: int) -> None:
        """After training step ``step``: the profiler's schedule, a memory snapshot and a garbage
        collection where due."""
        if self.traces is not None:
            with self.phases.phase("profiler", step):
                self.traces.step()
        if self.memory is not None and self.memory.due(step):
            with self.phases.phase("memory_snapshot", step):
                self.memory.dump(f"step-{step}")
        if self.gc_freq > 0 and step % self.gc_freq == 0:
            with self.phases.phase("gc", step):
                gc.collect(1)

    def on_out_of_memory(self, step: int, error: torch.OutOfMemoryError) -> None:
        """Write a snapshot of the memory at the error (with memory snapshots on) and name it in
        the error, which the caller re-raises; else say how to get one."""
        if self.memory is None:
            error.add_note(
                "--profiling.enable_memory_snapshot writes a snapshot of the memory at such an "
                "error (view it at pytorch.org/memory_viz)"
            )
            return
        try:
            path = self.memory.dump(f"step-{step}-oom")
        except Exception as e:  # the out-of-memory error is the one to raise
            logger.error("out of memory at step %d; its memory snapshot failed: %s", step, e)
            return
        logger.error("out of memory at step %d; memory snapshot: %s", step, path)
        error.add_note(f"memory snapshot of this rank at the error: {path}")

    def close(self) -> None:
        """Stop the profiler (writing a window the run's end cut short) and the memory history;
        give garbage collection back to Python."""
        if self.traces is not None and self.traces.started:
            try:
                self.traces.stop()
            except Exception as e:  # must not hide the error the run may be ending on
                logger.warning("profiler: the last trace could not be written: %s", e)
        self.traces = None
        if self.memory is not None:
            self.memory.stop()
            self.memory = None
        if self._gc_was_enabled:
            gc.enable()
        self._gc_was_enabled = None
