"""Looking inside a run: profiler traces per rank (1 process and FSDP 2), the CPU side of memory
snapshots, GC at fixed steps, and the phase timeline against the metrics' own step times. Two
runs serve every test (module-scoped fixtures)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_RUN, read_metrics, run_train

# Windows of 3 steps: warm-up on step 3k-1, record 3k, a trace at step-3k.
PROFILE_1 = ["--profiling.enable", "--profiling.freq=3", "--profiling.warmup_steps=1"]
STEPS_1 = 7
TOKENS_PER_STEP = 2 * 64  # TINY_RUN: local_batch_size 2 × seq_len 64


def _trace(path: Path) -> dict[str, Any]:
    trace: dict[str, Any] = json.loads(path.read_text())
    return trace


def _profiler_steps(trace: dict[str, Any]) -> set[str]:
    return {e["name"] for e in trace["traceEvents"] if e["name"].startswith("ProfilerStep#")}


def _phases(folder: Path, rank: int = 0) -> list[dict[str, Any]]:
    lines = (folder / "logs" / f"phases_rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process, 7 steps: traces at steps 3 and 6, the CPU memory view asked for, GC every
    2 steps."""
    folder = tmp_path_factory.mktemp("profile_single")
    run_train(
        folder,
        *TINY_RUN,
        f"--training.steps={STEPS_1}",
        "--training.gc_freq=2",
        *PROFILE_1,
        "--profiling.enable_memory_snapshot",
    )
    return folder


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP over 2 ranks, 3 steps: one window of 1 warm-up and 2 recorded steps."""
    folder = tmp_path_factory.mktemp("profile_fsdp")
    run_train(
        folder,
        *TINY_RUN,
        "--training.steps=3",
        "--parallelism.dp_shard=2",
        "--profiling.enable",
        "--profiling.freq=3",
        "--profiling.warmup_steps=1",
        "--profiling.active_steps=2",
        nproc=2,
    )
    return folder


def test_single_process_traces_hold_their_windows(single: Path) -> None:
    traces = single / "profile_traces"
    assert sorted(p.relative_to(traces).as_posix() for p in traces.rglob("*")) == [
        "step-3",
        "step-3/rank0.json",
        "step-6",
        "step-6/rank0.json",
    ]
    for step in (3, 6):
        trace = _trace(traces / f"step-{step}" / "rank0.json")
        assert _profiler_steps(trace) == {f"ProfilerStep#{step}"}
        assert trace["distributedInfo"]["rank"] == 0


def test_cpu_memory_view_is_the_trace(single: Path) -> None:
    """On CPU, --profiling.enable_memory_snapshot says that snapshots are CUDA-only and records
    the allocator's events in the trace instead."""
    log = [json.loads(line)["message"] for line in (single / "logs" / "rank0.jsonl").open()]
    assert any("allocator snapshots are CUDA-only" in message for message in log)
    assert not (single / "memory_snapshot").exists()
    trace = _trace(single / "profile_traces" / "step-6" / "rank0.json")
    assert trace["profile_memory"] == 1
    memory = [e for e in trace["traceEvents"] if e["name"] == "[memory]"]
    assert memory and all(e["args"]["Device Type"] == 0 for e in memory)  # 0: CPU
    assert max(e["args"]["Total Allocated"] for e in memory) > 0


def test_phases_sum_to_the_step_time_of_the_metrics(single: Path) -> None:
    """The phases add up to within 10% of the time the metrics logger measured between its
    records of steps 1 and 7 (tokens / tokens_per_sec per step, log_freq 1), and never to more:
    what they leave is the loop's bookkeeping. A step's work after its metrics record (the
    profiler, GC) falls in the next step's interval, so the intervals of steps 2-7 hold the
    data_wait, forward_backward and optimizer phases of steps 2-7 and the later ones of 1-6."""
    records = {r["step"]: r for r in read_metrics(single)}
    assert sorted(records) == list(range(1, STEPS_1 + 1))
    steps = range(2, STEPS_1 + 1)
    measured = sum(TOKENS_PER_STEP / records[s]["tokens_per_sec"] for s in steps)
    events = _phases(single)
    in_step = {"data_wait", "forward_backward", "optimizer"}
    phased = sum(
        e["duration_s"]
        for e in events
        if (e["step"] in steps and e["phase"] in in_step)
        or (e["step"] + 1 in steps and e["phase"] in {"profiler", "gc"})
    )
    assert 0.9 * measured <= phased <= measured + 1e-3, (phased, measured)
    names: defaultdict[int, list[str]] = defaultdict(list)
    for e in events:
        names[e["step"]].append(e["phase"])
    assert set(names) == set(range(1, STEPS_1 + 1))
    assert names[5] == ["data_wait", "forward_backward", "optimizer", "profiler"]
    assert names[6] == ["data_wait", "forward_backward", "optimizer", "profiler", "gc"]
    # The console's and metrics.jsonl's data-wait share is the data_wait phase over the step.
    for step in steps:
        (waited,) = (
            e["duration_s"] for e in events if (e["step"], e["phase"]) == (step, "data_wait")
        )
        seconds = TOKENS_PER_STEP / records[step]["tokens_per_sec"]
        assert records[step]["data_wait_share"] * seconds == pytest.approx(waited, abs=1e-5)


def test_fsdp_ranks_each_trace_the_window(fsdp: Path) -> None:
    traces = fsdp / "profile_traces"
    assert sorted(p.name for p in traces.iterdir()) == ["step-3"]
    for rank in (0, 1):
        trace = _trace(traces / "step-3" / f"rank{rank}.json")
        assert _profiler_steps(trace) == {"ProfilerStep#2", "ProfilerStep#3"}
        info = trace["distributedInfo"]
        assert (info["rank"], info["world_size"]) == (rank, 2)
        names = {e["name"] for e in trace["traceEvents"]}
        assert "FSDP::all_gather" in names and "gloo:all_gather" in names
        assert [e["phase"] for e in _phases(fsdp, rank) if e["step"] == 3] == [
            "data_wait",
            "forward_backward",
            "optimizer",
            "profiler",
        ]
