"""`tetrad eval`: a checkpoint's loss on the validation data is the val_loss its run logged at
that step (same data, same weights), on one process, from its Hugging Face export, and under
FSDP over two; bad input is one line."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train
from tetrad.cli import main as tetrad

VAL_RTOL = 1e-5
"""The same weights and batches; under FSDP, fp32 sums in another order."""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny run, validated on 2 batches and checkpointed at its end."""
    folder = tmp_path_factory.mktemp("eval") / "run"
    run_train(
        folder, *TINY_RUN, "--training.steps=2", "--validation.enable", "--validation.steps=2",
        "--checkpoint.enable", "--checkpoint.last_save_model_only",
    )  # fmt: skip
    return folder


def _logged(run: Path, step: int) -> float:
    (loss,) = [m["val_loss"] for m in read_metrics(run) if m["step"] == step and "val_loss" in m]
    return loss


def _printed(out: str) -> tuple[float, float]:
    match = re.search(r"^val_loss (\S+) val_perplexity (\S+) ", out, re.MULTILINE)
    assert match, out
    return float(match[1]), float(match[2])


def test_eval_equals_the_logged_validation_loss(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {path: path.stat().st_mtime_ns for path in run.rglob("*")}
    tetrad(["eval", f"--checkpoint={run / 'checkpoint' / 'step-2'}"])
    loss, perplexity = _printed(capsys.readouterr().out)
    assert loss == pytest.approx(_logged(run, 2), rel=VAL_RTOL)
    assert perplexity == pytest.approx(math.exp(loss), rel=1e-4)
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == files, (
        "eval writes nothing into the run's folder"
    )

    # The same weights exported to a Hugging Face folder, the run's options given explicitly.
    hf = tmp_path / "hf"
    tetrad(["convert", str(run / "checkpoint" / "step-2"), str(hf)])
    capsys.readouterr()
    run_options = ["--model.flavor=tiny", "--training.seq_len=64", "--training.local_batch_size=2"]
    tetrad(["eval", f"--checkpoint={hf}", *run_options, "--validation.steps=2"])
    assert _printed(capsys.readouterr().out)[0] == pytest.approx(_logged(run, 2), rel=VAL_RTOL)


@pytest.mark.slow
def test_eval_under_fsdp_equals_the_logged_validation_loss(run: Path) -> None:
    """Two ranks of one sequence each: the run's global batch of two, evaluated sharded."""
    cmd = [sys.executable, "-m", "tetrad.cli", "eval", "--nproc=2", "--parallelism.dp_shard=2"]
    cmd += ["--training.local_batch_size=1", f"--checkpoint={run / 'checkpoint' / 'step-2'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    loss, _ = _printed(result.stdout)
    assert loss == pytest.approx(_logged(run, 2), rel=VAL_RTOL)


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes").mkdir()
    for folder, problem in [
        (tmp_path / "nowhere", "does not exist"),
        (
            tmp_path / "notes",
            "is neither a DCP checkpoint (.metadata) nor a Hugging Face folder (config.json)",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tetrad(["eval", f"--checkpoint={folder}"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"tetrad: error: --checkpoint {folder} {problem}\n"
