"""Faults a run survives: non-finite steps (stopped or skipped, never checkpointed), stop signals
(every rank stops after the same step, saves, exits 0, resumes exactly), Ctrl-C, and resumes
that change the schedule or redo logged steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train
from tetrad.components.lr_scheduler import wsd_factor

CHECKPOINT_EVERY_STEP = ["--checkpoint.enable", "--checkpoint.interval=1"]


def _strict_records(folder: Path) -> list[dict[str, float | None]]:
    """metrics.jsonl as strict JSON: a bare NaN or Infinity fails here."""

    def refuse(constant: str) -> None:
        raise ValueError(f"metrics.jsonl holds {constant}")

    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def _states(step_folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, by flattened key, read back by torch's own converter."""
    file = tmp_path / f"{step_folder.name}.pt"
    dcp_to_torch_save(step_folder, file)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(file, weights_only=False))  # our own file, written just above
    return flat


def _stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # The report: at lr 1e4 without clipping the loss turns NaN at step 4, and
    # --checkpoint.keep_latest_k 1 used to delete the last good checkpoint for a NaN one.
    args = ["--optimizer.lr=1e4", "--training.max_norm=0", "--training.steps=8"]
    args += [*CHECKPOINT_EVERY_STEP, "--checkpoint.keep_latest_k=1"]
    result = run_train(tmp_path, *TINY_RUN, *args, expect_ok=False)
    assert result.returncode == 3, result.stderr[-2000:]
    records = _strict_records(tmp_path)
    bad = next(r for r in records if r["loss"] is None)
    (line,) = _stderr_lines(result)
    last_good = tmp_path / "checkpoint" / f"step-{bad['step'] - 1}"
    assert line.startswith(f"tetrad: error: step {bad['step']}: non-finite loss nan")
    assert f"Last good checkpoint: {last_good}." in line
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == [last_good.name]
    weights = _states(last_good, tmp_path)
    assert all(torch.isfinite(t).all() for k, t in weights.items() if k.startswith("model."))


def test_skipped_step_leaves_weights_optimizer_and_schedule_untouched(tmp_path: Path) -> None:
    args = ["--training.steps=4", "--debug.nonfinite_at_step=3", "--training.on_nonfinite=skip"]
    run_train(tmp_path, *TINY_RUN, *args, *CHECKPOINT_EVERY_STEP)
    records = {r["step"]: r for r in _strict_records(tmp_path)}
    assert records[3]["loss"] is None and records[3]["skipped_steps"] == 1
    assert records[4]["skipped_steps"] == 1 and records[4]["loss"] is not None
    # The step-3 checkpoint holds exactly step 2's model, optimizer and LR schedule.
    before, after = (_states(tmp_path / "checkpoint" / f"step-{s}", tmp_path) for s in (2, 3))
    kept = [k for k in before if k.split(".")[0] in ("model", "optimizer", "lr_scheduler")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert records[4]["lr"] == records[3]["lr"]  # the schedule did not advance either


def _rank_pids(launcher: int) -> dict[int, int]:
    """Global rank → pid of the ranks a `tetrad train --nproc` process launched (Linux /proc)."""
    ranks = {}
    for children in Path(f"/proc/{launcher}/task").glob("*/children"):
        for pid in map(int, children.read_text().split()):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if rank := [v for v in environ if v.startswith(b"RANK=")]:
                ranks[int(rank[0][5:])] = pid
    return ranks


def _wait_for_step(folder: Path, step: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (folder / "metrics.jsonl").exists() and len(read_metrics(folder)) >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"no step {step} logged in {folder}")


def _start_train(folder: Path, *args: str, nproc: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tetrad.cli", "train", f"--nproc={nproc}"]
    cmd += [f"--job.dump_folder={folder}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **pipes)


PREEMPTED = [*TINY_RUN, "--training.steps=40", "--parallelism.dp_shard=2", *CHECKPOINT_EVERY_STEP]
PREEMPTED += ["--checkpoint.interval=100"]  # only the stop and the last step save


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    """SIGUSR1 to rank 1 alone (a preemption notice): both ranks stop after the same step, save
    it and exit 0; the next start resumes there, and its losses equal an uninterrupted run's
    bit for bit."""
    stopped = tmp_path / "stopped"
    process = _start_train(stopped, *PREEMPTED, nproc=2)
    _wait_for_step(stopped, 3, process)
    os.kill(_rank_pids(process.pid)[1], signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    (step_folder,) = (stopped / "checkpoint").iterdir()
    stop_step = int(step_folder.name.removeprefix("step-"))
    assert stop_step < 40 and [r["step"] for r in read_metrics(stopped)][-1] == stop_step
    # Rank 0, which prints, learnt of the signal from rank 1.
    assert f"stopped after step {stop_step} on a stop signal (received by another rank)" in stdout
    run_train(stopped, *PREEMPTED, nproc=2)
    reference = tmp_path / "reference"
    run_train(reference, *PREEMPTED, nproc=2)
    assert [r["loss"] for r in read_metrics(stopped)] == [
        r["loss"] for r in read_metrics(reference)
    ]


def test_ctrl_c_is_one_line(tmp_path: Path) -> None:
    process = _start_train(tmp_path, *TINY_RUN, "--training.steps=400", nproc=1)
    _wait_for_step(tmp_path, 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "tetrad: interrupted; checkpoints already written are kept (rerun to resume)"
    ]


def test_resume_follows_the_new_schedule_and_logs_each_step_once(tmp_path: Path) -> None:
    """A 4-step run extended to 6: the first resumed step takes the 6-step schedule's LR (it
    used to log lr 0, the old schedule's end). Then a crash after step 6 was logged but before
    its checkpoint (its folder removed): the rerun redoes step 6 without a second record."""
    base = [a for a in TINY_RUN if not a.startswith("--training.steps")]
    base += ["--checkpoint.enable", "--checkpoint.interval=2", "--metrics.enable_tensorboard"]
    run_train(tmp_path, *base, "--training.steps=4")
    extended = run_train(tmp_path, *base, "--training.steps=6")
    assert "--training.steps 4 → 6" in extended.stderr + extended.stdout
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path)}
    factor = wsd_factor(
        4, total_steps=6, warmup_steps=1, decay_ratio=None, decay_type="linear", min_lr_factor=0
    )
    assert lr[5] == pytest.approx(1e-3 * factor, rel=1e-6) and lr[5] > 0
    (tmp_path / "checkpoint" / "step-6" / "COMPLETE").unlink()
    run_train(tmp_path, *base, "--training.steps=6")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
