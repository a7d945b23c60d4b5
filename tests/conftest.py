"""Shared helpers: run `tetrad train` as real processes and read back what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A tiny, fast, deterministic fp32 run; tests override what they study.
TINY_RUN = [
    "--model.flavor=tiny",
    "--training.steps=4",
    "--training.seq_len=64",
    "--training.local_batch_size=2",
    "--lr_scheduler.warmup_steps=1",
    "--optimizer.lr=1e-3",
    "--metrics.log_freq=1",
    "--debug.deterministic",
    "--comm.train_timeout_seconds=60",
    "--comm.init_timeout_seconds=60",
]


def run_train(
    dump_folder: Path, *args: str, nproc: int = 1, expect_ok: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """`tetrad train` in fresh processes (torchrun when nproc > 1), as a user runs it."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
    }
    cmd = [sys.executable, "-m", "tetrad.cli", "train", f"--nproc={nproc}"]
    cmd += [f"--job.dump_folder={dump_folder}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if expect_ok and result.returncode != 0:
        pytest.fail(
            f"train failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def read_metrics(dump_folder: Path) -> list[dict[str, float]]:
    with (dump_folder / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f]
