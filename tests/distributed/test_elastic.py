"""Elastic restart: a rank SIGKILLed mid-run under `--max-restarts 1`; the group restarts, resumes
from the newest complete checkpoint on its own, and its losses after the resume point equal an
uninterrupted run's bit for bit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, read_metrics, run_train

RUN = [*TINY_RUN, "--training.steps=6"]
KILLED = ["--checkpoint.enable", "--checkpoint.interval=1", "--max-restarts=1"]
KILLED += ["--debug.fault=kill", "--debug.fault_rank=1", "--debug.fault_at_step=4"]


def _losses(folder: Path) -> dict[int, float]:
    # The last row per step: a resumed run's file may repeat the steps after the resume point.
    return {int(row["step"]): row["loss"] for row in read_metrics(folder) if "loss" in row}


@pytest.mark.slow
def test_killed_rank_restarts_and_continues_exactly(tmp_path: Path) -> None:
    # Both runs at once: the whole test takes about as long as the interrupted run. The
    # reference saves no checkpoints: saving must not change the training either.
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(run_train, tmp_path / "reference", *RUN, nproc=2)
        killed = pool.submit(run_train, tmp_path / "killed", *RUN, *KILLED, nproc=2)
        reference.result()
        out = killed.result().stdout  # exit code 0, else run_train fails the test
    assert "--debug.fault kill: rank 1 at step 4" in out  # the kill happened...
    resumed = tmp_path / "killed" / "checkpoint" / "step-3"
    assert f"restart 1 of 1: resuming from {resumed}" in out  # ...and the group restarted
    expected, got = _losses(tmp_path / "reference"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]  # exact equality
