"""Shared helpers: run `tetrad train` as real processes and read back what it logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
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


# A short high-learning-rate run from which the parity tests start: at initialisation attention
# is almost uniform, so wrong positions or a wrongly scaled query/key gradient barely move the
# loss; after 40 steps at 1e-2 (loss 9.5 → ~6.6) the heads attend selectively.
TRAIN_FOR_WEIGHTS = [
    "--training.steps=40",
    "--training.seq_len=64",
    "--training.local_batch_size=8",
    "--lr_scheduler.warmup_steps=2",
    "--optimizer.lr=1e-2",
    "--metrics.log_freq=10",
    "--debug.deterministic",
    "--checkpoint.enable",
    "--checkpoint.interval=1000",
    "--checkpoint.last_save_model_only",
]


@pytest.fixture(scope="session")
def trained_weights(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Model flavor → a model-only DCP checkpoint (step folder) of that flavor after 40 steps
    of single-process training, made once per session on first use (~7 s each)."""
    made: dict[str, Path] = {}

    def get(flavor: str) -> Path:
        if flavor not in made:
            folder = tmp_path_factory.mktemp(f"trained_{flavor}")
            run_train(folder, f"--model.flavor={flavor}", *TRAIN_FOR_WEIGHTS)
            made[flavor] = folder / "checkpoint" / "step-40"
            assert (made[flavor] / ".metadata").is_file()
        return made[flavor]

    return get
