"""Checkpoint faults end to end: a checkpoint whose bytes changed after it was saved is refused
with one line (under `--nproc 2`, the two ranks sharing the verification), and a save that the
OS refuses mid-run (a file-size limit: a real EFBIG write error, as a full disk gives) stops the
run with one line and exit code 3, the checkpoint before it intact. One process where two add
nothing: each multi-process start costs seconds."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train
from tetrad.components.checkpoint_folder import checkpoint_problem

ARGS = [*TINY_RUN, "--checkpoint.enable", "--checkpoint.interval=2"]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder after 2 steps, with its checkpoint step-2."""
    run = tmp_path_factory.mktemp("saved") / "run"
    run_train(run, *ARGS, "--training.steps=2")
    return run


def _copy(saved_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    return run, run / "checkpoint"


def _error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    return line


@pytest.mark.slow  # two processes
def test_flipped_byte_in_a_shard_is_refused(saved_run: Path, tmp_path: Path) -> None:
    """One bit of the shard flipped (sizes unchanged). Resumed by FSDP 2: rank 1, which
    verifies that file (rank 0 takes .metadata), finds it, and both ranks stop before training
    with one line naming the checkpoint and the file."""
    run, folder = _copy(saved_run, tmp_path)
    shard = folder / "step-2" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    rows = read_metrics(run)
    args = [*ARGS, "--training.steps=4", "--parallelism.dp_shard=2"]
    result = run_train(run, *args, nproc=2, expect_ok=False)
    assert _error_line(result, 2) == (
        f"tetrad: error: checkpoint {folder / 'step-2'}: its file __0_0.distcp does not match "
        "the checksum recorded when it was saved (its content is corrupt); move it out of "
        f"{folder} to start afresh"
    )
    assert read_metrics(run) == rows


def _limit_file_size(size: int) -> Callable[[], None]:
    def limit() -> None:  # in the child, before exec: torchrun and the ranks inherit it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def test_full_disk_mid_run_stops_with_the_previous_checkpoint_intact(
    saved_run: Path, tmp_path: Path
) -> None:
    """The run resumes from step-2 and trains step 3; writing step-3's shard past half a shard's
    size fails in the OS (EFBIG). Exit 3, one line naming step-3 and the error; no step-3.tmp
    left; step-2 byte for byte as saved, its checksums verified, so the next start resumes from
    it as this one did."""
    run, folder = _copy(saved_run, tmp_path)
    step2 = {p.name: p.read_bytes() for p in (folder / "step-2").iterdir()}
    cmd = [sys.executable, "-m", "tetrad.cli", "train", f"--job.dump_folder={run}"]
    result = subprocess.run(
        [*cmd, *ARGS, "--training.steps=3"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        preexec_fn=_limit_file_size(len(step2["__0_0.distcp"]) // 2),
    )  # fmt: skip
    assert _error_line(result, 3) == (
        f"tetrad: error: could not save checkpoint {folder / 'step-3'}: [Errno 27] File too "
        "large (rank 0); the checkpoints before it are intact"
    )
    assert f"resumed from {folder / 'step-2'}" in result.stdout
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]
    assert {p.name: p.read_bytes() for p in (folder / "step-2").iterdir()} == step2
    assert checkpoint_problem(folder / "step-2", verify=True) is None
