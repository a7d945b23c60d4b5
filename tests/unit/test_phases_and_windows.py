"""The profiler's windows count the run's steps, also after a resume; compilations are marked
inside the phase that ran them. In one process, with the real torch.profiler and Dynamo."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.profiler import ProfilerAction

from tetrad.components.phases import PhaseTimeline
from tetrad.components.profiling import TraceWindows
from tetrad.config.job_config import ProfilingConfig

N, W, R, S = (
    ProfilerAction.NONE,
    ProfilerAction.WARMUP,
    ProfilerAction.RECORD,
    ProfilerAction.RECORD_AND_SAVE,
)


def test_window_is_the_last_steps_of_each_freq(tmp_path: Path) -> None:
    config = ProfilingConfig(enable=True, freq=5, warmup_steps=2, active_steps=2)
    windows = TraceWindows(config, tmp_path, rank=0, cuda=False, profile_memory=False)
    assert [windows.action(step) for step in range(1, 11)] == [N, W, W, R, S] * 2


def test_resumed_run_traces_the_same_steps(tmp_path: Path) -> None:
    """A run resumed after step 4 with windows of 3 steps writes step-6, whose trace spans the
    run's steps 5 (warm-up, not in it) and 6: ProfilerStep#6 alone."""
    config = ProfilingConfig(enable=True, freq=3, warmup_steps=1, active_steps=1)
    windows = TraceWindows(config, tmp_path, rank=3, cuda=False, profile_memory=False)
    windows.start(first_step=5)
    x = torch.ones(8, 8)
    for _ in (5, 6, 7):
        x = x @ x / 8
        windows.step()
    windows.stop()
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")] == [
        "step-6/rank3.json"
    ]
    trace = json.loads((tmp_path / "step-6" / "rank3.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e["name"].startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#6"}
    assert any(e["name"] == "aten::mm" for e in trace["traceEvents"])


def test_compilations_are_marked_inside_their_phase(tmp_path: Path) -> None:
    path = tmp_path / "phases_rank0.jsonl"
    timeline = PhaseTimeline(path, rank=0, watch_compile=True)
    compiled = torch.compile(lambda x: torch.sin(x) * 2, backend="eager")
    try:
        with timeline.phase("data_wait", step=1):
            pass
        with timeline.phase("forward_backward", step=1):
            compiled(torch.ones(4))
        with timeline.phase("forward_backward", step=2):
            compiled(torch.ones(4))  # compiled already: nothing to mark
    finally:
        timeline.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["step"], e["phase"], e.get("within")) for e in events] == [
        (1, "data_wait", None),
        (1, "compile", "forward_backward"),
        (1, "forward_backward", None),
        (2, "forward_backward", None),
    ]
    # The compilation lies within forward_backward (to 1 ms: starts are wall-clock readings,
    # durations the monotonic clock's).
    compile_, outer = events[1], events[2]
    assert outer["start"] - 1e-3 <= compile_["start"]
    end, outer_end = (e["start"] + e["duration_s"] for e in (compile_, outer))
    assert end <= outer_end + 1e-3
    assert 0 < compile_["duration_s"] <= outer["duration_s"]
