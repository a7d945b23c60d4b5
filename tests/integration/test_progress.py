"""Progress bars: on a terminal, checkpoint saves and loads show this rank's bytes against the
checkpoint's own size (read back from DCP's metadata by the real library), and a compile
warm-up shows time passing; in logs (output not a terminal) and on other ranks, nothing."""

from __future__ import annotations

import fcntl
import math
import os
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

from tests.conftest import REPO, TINY_RUN, run_train
from tetrad.tools.progress import heartbeat

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _terminal() -> tuple[int, int]:
    """A pseudo-terminal (controller and terminal ends) of 40 × 160 characters: tqdm draws
    nothing on one without a size."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    return controller, terminal


def _on_terminal(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal; its exit code and output."""
    controller, terminal = _terminal()
    process = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, cwd=REPO
    )
    os.close(terminal)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal's last writer closed it
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return process.wait(timeout=10), ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def _tensor_bytes(step_folder: Path) -> int:
    metadata = FileSystemReader(step_folder).read_metadata()
    return sum(
        math.prod(stored.size) * stored.properties.dtype.itemsize
        for stored in metadata.state_dict_metadata.values()
        if isinstance(stored, TensorStorageMetadata)
    )


def _finished_bar(description: str, total: int) -> str:
    size = tqdm.format_sizeof(total, divisor=1024)
    return rf"{re.escape(description)}: 100%\|[^|]*\| {re.escape(size)}/{re.escape(size)} "


def test_checkpoint_bars_on_a_terminal_and_none_in_logs(tmp_path: Path) -> None:
    run = [*TINY_RUN, "--training.steps=2", "--checkpoint.enable", "--checkpoint.interval=2"]
    logged = run_train(tmp_path, *run)
    for stream in (logged.stdout, logged.stderr):
        assert "saving step-2" not in stream and "%|" not in stream

    cmd = [sys.executable, "-m", "tetrad.cli", "train", f"--job.dump_folder={tmp_path}"]
    code, shown = _on_terminal([*cmd, *run, "--training.steps=4"])
    assert code == 0, shown[-3000:]
    checkpoints = tmp_path / "checkpoint"
    loaded, saved = _tensor_bytes(checkpoints / "step-2"), _tensor_bytes(checkpoints / "step-4")
    assert loaded > 0 and saved > 0
    # One process holds every tensor: the bars end at the checkpoints' whole size.
    assert re.search(_finished_bar("loading step-2", loaded), shown), shown[-3000:]
    assert re.search(_finished_bar("saving step-4", saved), shown), shown[-3000:]


@pytest.mark.parametrize(
    ("rank", "enabled", "shown"), [("0", True, True), ("0", False, False), ("1", True, False)]
)
def test_heartbeat_shows_time_passing_on_rank_0(
    monkeypatch: pytest.MonkeyPatch, rank: str, enabled: bool, shown: bool
) -> None:
    controller, terminal = _terminal()
    with os.fdopen(terminal, "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        monkeypatch.setenv("RANK", rank)
        with heartbeat("compiling (first step)", enabled=enabled):
            time.sleep(1.3)
        stderr.flush()
        os.set_blocking(controller, False)
        try:
            output = os.read(controller, 65536).decode()
        except BlockingIOError:
            output = ""
    os.close(controller)
    assert ("compiling (first step): 00:01" in output) is shown, output
