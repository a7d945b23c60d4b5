"""torchft replica groups on CPU with gloo: two groups, one killed mid-run and started again in
its folder. The survivor steps on alone in its one attempt, the restarted group takes the current
state from it (torchft's recovery: it has no checkpoint of its own), and both end with the same
weights, bit for bit (each step applies the same averaged gradients to the same state).

Each group is one process (no torchrun): two groups of two FSDP ranks run the same code path
(checked by hand: the second group's initial recovery at step 1) but take ~100 s here with a
restart, over this test's budget. One process per group also lets the test kill a whole group
with one killpg: torchrun starts its workers in sessions of their own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_RUN, read_metrics
from tests.distributed.dcp_checks import model_weights, step_dir

torchft = pytest.importorskip("torchft")

STEPS = 40
RUN = [
    *TINY_RUN,
    f"--training.steps={STEPS}",
    "--lr_scheduler.warmup_steps=2",
    "--fault_tolerance.enable",
    "--fault_tolerance.group_count=2",
    "--fault_tolerance.timeout_seconds=30",
    "--checkpoint.enable",
    f"--checkpoint.interval={10 * STEPS}",  # the final save only: nothing to resume from
]
ALONE = re.compile(r"fault tolerance: step (\d+) with (\d+) of 2 replica groups")
JOINED = "fault tolerance: replica group {} of 2"  # logged once its manager is up
RECOVERED = re.compile(
    r"fault tolerance: recovered step (\d+) from a live replica group in ([\d.]+) s"
)


def _start(folder: Path, replica_id: int, lighthouse: str, log: Path) -> subprocess.Popen[bytes]:
    """One replica group, a real `tetrad train` in a session of its own (killed as a whole)."""
    env = {**os.environ, "TORCHFT_LIGHTHOUSE": lighthouse, "RUST_LOG": "warn"}
    cmd = [sys.executable, "-m", "tetrad.cli", "train", f"--job.dump_folder={folder}"]
    cmd += [f"--fault_tolerance.replica_id={replica_id}", *RUN]
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _tail(log: Path, offset: int) -> str:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _logged_steps(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    # Complete lines only: the file may be read while a record is being written.
    return [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1] if line]


def _throttle(proc: subprocess.Popen[bytes], *, until: Callable[[], bool]) -> None:
    """Run ``proc`` a tenth of the time until ``until()``: paused 0.9 s of every 1, below the
    lighthouse's 2 s heartbeat timeout, so that it stays in the quorum."""
    while not until():
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(0.9)
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.1)


def _has_line(proc: subprocess.Popen[bytes], log: Path, line: str, offset: int) -> bool:
    """Whether ``log`` holds ``line`` after ``offset`` (or ``proc`` ended: nothing to wait for)."""
    return proc.poll() is not None or line in _tail(log, offset)


def _first_step_together(log: Path) -> int | None:
    """The first step group 0 took in a quorum of both groups."""
    together = [int(s) for s, n in ALONE.findall(log.read_text(errors="replace")) if n == "2"]
    return together[0] if together else None


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, line: str, deadline: float) -> None:
    while line not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {line!r} in time:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _wait(proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"replica group did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
    assert code == 0, f"replica group failed ({code}):\n{log.read_text()[-3000:]}"


@pytest.mark.slow
def test_killed_replica_group_recovers_from_the_survivor(tmp_path: Path) -> None:
    from torchft.coordination import LighthouseServer

    # A group whose heartbeat stops for 2 s is dead to the lighthouse (default 5 s): the
    # survivor's wait for a new quorum after the kill.
    lighthouse = LighthouseServer(
        bind="[::]:0", min_replicas=1, join_timeout_ms=2000, heartbeat_timeout_ms=2000
    )
    survivor_dir, victim_dir = tmp_path / "group0", tmp_path / "group1"
    survivor_log, victim_log = tmp_path / "group0.log", tmp_path / "group1.log"
    try:
        # A group alone steps at full speed: until group 1's manager is up, group 0 runs a tenth
        # of the time (throttled, see below), so that it cannot finish the run alone however
        # slowly group 1 starts. Group 1 is killed once both have taken a step in one quorum:
        # group 0 logged a step with 2 of 2 groups and group 1 logged that step (the survivor
        # then holds the state; killed earlier, group 1 could be the survivor's recovery source).
        deadline = time.monotonic() + 60
        survivor = _start(survivor_dir, 0, lighthouse.address(), survivor_log)
        _wait_for_line(survivor, survivor_log, JOINED.format(0), deadline)
        victim = _start(victim_dir, 1, lighthouse.address(), victim_log)
        _throttle(survivor, until=lambda: _has_line(victim, victim_log, JOINED.format(1), 0))
        while (together := _first_step_together(survivor_log)) is None or max(
            _logged_steps(victim_dir), default=0
        ) < together:
            assert victim.poll() is None, victim_log.read_text()[-3000:]
            assert survivor.poll() is None, survivor_log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the groups never took a step together"
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        killed_at = time.monotonic()
        kill_step = max(_logged_steps(victim_dir))  # its last logged step
        assert kill_step < STEPS - 8, f"group 1 ran {kill_step} steps before the kill"
        restart_offset = victim_log.stat().st_size
        restarted = _start(victim_dir, 1, lighthouse.address(), victim_log)
        # Until group 1's manager is up again: the survivor steps on alone at full speed for
        # 3 steps, then throttled, so that it cannot finish the run before group 1 is back
        # however slowly that restarts, nor fail to step alone however slowly it runs.
        while max(_logged_steps(survivor_dir), default=0) < kill_step + 3:
            assert survivor.poll() is None, survivor_log.read_text()[-3000:]
            time.sleep(0.05)
        _throttle(
            survivor,
            until=lambda: _has_line(restarted, victim_log, JOINED.format(1), restart_offset),
        )
        while max(_logged_steps(victim_dir), default=0) <= kill_step and restarted.poll() is None:
            time.sleep(0.05)
        down_seconds = time.monotonic() - killed_at  # from the kill to its first step back
        _wait(survivor, 120, survivor_log)
        _wait(restarted, 60, victim_log)
    finally:
        lighthouse.shutdown()

    # The survivor: one attempt, every step once from the one it joined at, some taken alone
    # while group 1 was down.
    steps = [r["step"] for r in read_metrics(survivor_dir)]
    assert steps == list(range(steps[0], STEPS + 1)) and steps[0] <= kill_step, steps
    changes = [(int(s), int(n)) for s, n in ALONE.findall(survivor_log.read_text())]
    alone_from = next(s for s, n in changes if n == 1 and s > kill_step)
    together_again = next(s for s, n in changes if n == 2 and s > alone_from)
    alone_steps = together_again - alone_from
    assert alone_steps >= 2, changes

    # The restarted group: recovered the survivor's step (it had no checkpoint), then went on.
    (recovered,) = RECOVERED.findall(_tail(victim_log, restart_offset))
    step, seconds = int(recovered[0]), float(recovered[1])
    assert step == together_again - 1, (step, changes)
    after_kill = [s for s in _logged_steps(victim_dir) if s > kill_step]
    assert after_kill == list(range(step + 1, STEPS + 1))

    final_a = model_weights(step_dir(survivor_dir, STEPS))
    final_b = model_weights(step_dir(victim_dir, STEPS))
    assert final_a.keys() == final_b.keys()
    for name, weight in final_a.items():
        assert weight.equal(final_b[name]), name
    print(
        f"survivor: {alone_steps} steps alone (steps {alone_from}..{together_again - 1}); "
        f"group 1 back {down_seconds:.1f} s after the kill (restart included), its quorum and "
        f"recovery of step {step}: {seconds:.2f} s; final weights bit-identical"
    )
