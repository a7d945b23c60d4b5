"""Bad input of every kind is one line on stderr and exit code 2, and leaves the run folder as it
was: the table below, run as a user runs it (``tetrad.cli.main`` in this process; the --nproc
rows through torchrun in subprocesses, started first so that they overlap the others)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_RUN
from tetrad.cli import main
from tetrad.components.run_folder import hold_run_folder
from tetrad.config import Config

STARTS = "tetrad: error: "
_RECORD = json.dumps({"text": "def f(x):\n    return x + 1\n" * 20})


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@dataclass(frozen=True)
class Row:
    args: Callable[[Path], list[str]]
    """The command line (after ``tetrad``), given a scratch folder."""
    expect: str
    """A part of the one line."""
    started: bool = False
    """The error is found once training has started (a record the loader reaches, data that
    runs out before one sequence): the run folder may then hold the config and the logs, and
    nothing else."""


def _train(*args: str) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        run = [f"--job.dump_folder={tmp / 'run'}", *TINY_RUN, "--training.steps=2"]
        return ["train", *run, *(arg.format(tmp=tmp) for arg in args)]

    return argv


def _convert(src: str, dst: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["convert", src.format(tmp=tmp), dst.format(tmp=tmp)]


ROWS: dict[str, Row] = {
    # config
    "lr_inf": Row(_train("--optimizer.lr=inf"), "--optimizer.lr must be a finite number >= 0"),
    "lr_nan": Row(_train("--optimizer.lr=nan"), "--optimizer.lr must be a finite number >= 0"),
    "lr_negative": Row(_train("--optimizer.lr=-1e-3"), "got -0.001"),
    "weight_decay_nan": Row(_train("--optimizer.weight_decay=nan"), "--optimizer.weight_decay"),
    "max_norm_negative": Row(_train("--training.max_norm=-1"), "--training.max_norm"),
    "beta2_one": Row(_train("--optimizer.beta2=1"), "--optimizer.beta2 must be within [0, 1)"),
    "warmup_chosen_too_long": Row(
        _train("--lr_scheduler.warmup_steps=3"), "--lr_scheduler.warmup_steps 3 must be within 0..2"
    ),
    "dump_folder_empty": Row(_train("--job.dump_folder="), "--job.dump_folder is empty"),
    "unknown_option": Row(_train("--training.stpes=3"), "did you mean --training.steps?"),
    # model and tokenizer
    "model_flavor": Row(_train("--model.flavor=huge"), "unknown --model.flavor 'huge'"),
    "hf_model_folder": Row(
        _train("--model.name=hf", "--model.hf_path={tmp}/data", "--data.tokenizer=default"),
        "cannot read config.json",
    ),
    "tokenizer_folder": Row(_train("--data.tokenizer={tmp}/data"), "holds no tokenizer.json"),
    "tokenizer_file": Row(
        _train("--data.tokenizer={tmp}/data/good.jsonl"), "invalid tokenizer.json"
    ),
    # data: found at start-up
    "data_missing": Row(_train("--data.path={tmp}/data/nope.jsonl"), "does not exist"),
    "data_suffix": Row(_train("--data.path={tmp}/data/table.csv"), "found suffixes ['.csv']"),
    "data_empty": Row(_train("--data.path={tmp}/data/empty.txt"), "empty.txt is empty"),
    "data_corrupt_first": Row(
        _train("--data.path={tmp}/data/corrupt_first.jsonl"),
        "corrupt_first.jsonl, line 1: invalid JSON",
    ),
    "data_not_utf8_first": Row(
        _train("--data.path={tmp}/data/latin1.txt"),
        "latin1.txt, line 1: not UTF-8 text (byte 0xe9)",
    ),
    # data: found when the loader reaches the record (encodes it; ends its first pass)
    # (`datasets` parses a block of records at once: a bad one in the first block is found
    # at start-up, and named by line)
    "data_corrupt_later": Row(
        _train("--data.path={tmp}/data/corrupt_later.jsonl"),
        "corrupt_later.jsonl, line 3: invalid JSON",
    ),
    "data_null_text": Row(
        _train("--data.path={tmp}/data/null_text.jsonl"),
        "null_text.jsonl, line 2: 'text' is None, not text",
        started=True,
    ),
    "data_not_utf8_later": Row(
        _train("--data.path={tmp}/data/latin1_later.txt"),
        "latin1_later.txt, line 2: not UTF-8 text",
    ),
    "data_shorter_than_a_sequence": Row(
        _train("--data.path={tmp}/data/short.txt"),
        "short.txt' holds 3 tokens for dp rank 0 of 1, fewer than one sequence",
        started=True,
    ),
    # checkpoints
    "load_step_missing": Row(
        _train("--checkpoint.enable", "--checkpoint.load_step=7"), "step-7: it does not exist"
    ),
    "initial_load_not_a_checkpoint": Row(
        _train("--checkpoint.initial_load_path={tmp}/data"), "not a DCP checkpoint"
    ),
    # convert
    "convert_missing_src": Row(_convert("{tmp}/nope", "{tmp}/out"), "nope does not exist"),
    "convert_src_not_a_checkpoint": Row(
        _convert("{tmp}/data", "{tmp}/out"), "neither a DCP checkpoint"
    ),
    "convert_dst_exists": Row(_convert("{tmp}/data", "{tmp}/data"), "already exists"),
    # folders
    "dump_folder_is_a_file": Row(
        _train("--job.dump_folder={tmp}/data/good.jsonl"), "is a file, not a folder"
    ),
    "checkpoint_folder_is_a_file": Row(
        _train("--checkpoint.enable", "--checkpoint.folder=config.toml"),
        "--checkpoint.folder",
    ),
}


def _make_data(folder: Path) -> None:
    _write(folder / "good.jsonl", f"{_RECORD}\n" * 8)
    _write(folder / "table.csv", "text\nhello\n")
    _write(folder / "empty.txt", "")
    _write(folder / "corrupt_first.jsonl", '{"text": "a\n')
    _write(folder / "latin1.txt", "café\n".encode("latin-1"))
    _write(folder / "corrupt_later.jsonl", f"{_RECORD}\n{_RECORD}\n{{'text': 1}}\n")
    _write(folder / "null_text.jsonl", f'{_RECORD}\n{{"text": null}}\n')
    _write(folder / "latin1_later.txt", b"fine\n" + "café\n".encode("latin-1"))
    _write(folder / "short.txt", "hi")


def tree_digest(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` → its content's sha256 ("dir" for folders); {} if absent."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): (
            "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        )
        for path in sorted(folder.rglob("*"))
    }


def _existing_run(run: Path) -> None:
    """A run folder as a finished run leaves it (what a bad command must not touch)."""
    _write(run / "config.toml", "[training]\nsteps = 2\n")
    _write(run / "metrics.jsonl", '{"step": 1, "loss": 9.0}\n')
    _write(run / "logs" / "rank0.jsonl", '{"message": "done"}\n')


def run_cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Exit code and the non-blank lines on stderr of ``tetrad ARGV``, in this process."""
    capfd.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def assert_one_line(code: int, lines: list[str], expect: str, *, exit_code: int = 2) -> None:
    assert code == exit_code, lines
    assert 1 <= len(lines) <= 2, lines
    assert not any("Traceback" in line for line in lines), lines
    assert lines[-1].startswith(STARTS) and expect in lines[-1], lines


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    _make_data(tmp_path / "data")
    _existing_run(tmp_path / "run")
    return tmp_path


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name: str, scratch: Path, capfd: pytest.CaptureFixture[str]) -> None:
    row = ROWS[name]
    run = scratch / "run"
    before = tree_digest(run)
    code, lines = run_cli(row.args(scratch), capfd)
    assert_one_line(code, lines, row.expect)
    after = tree_digest(run)
    if not row.started:
        assert after == before
    else:  # the run started: its config and logs (the phase timeline's too), no metrics row,
        # no checkpoint
        changed = {path for path in after if before.get(path) != after[path]}
        assert changed <= {"config.toml", "logs/rank0.jsonl", "logs/phases_rank0.jsonl"}, changed
        assert after["metrics.jsonl"] == before["metrics.jsonl"]


def test_bad_input_in_a_new_folder_leaves_no_folder(
    scratch: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    new = scratch / "new" / "run"
    argv = ["train", f"--job.dump_folder={new}", *TINY_RUN]
    code, lines = run_cli([*argv, f"--data.path={scratch}/data/empty.txt"], capfd)
    assert_one_line(code, lines, "is empty")
    assert not (scratch / "new").exists()


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """``folder`` that this process cannot write to: chmod, and for root (whom modes do not
    stop) the immutable attribute; skips where neither holds."""
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None
    if immutable:
        subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True)
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            yield
            return
        (folder / "probe").unlink()
        pytest.skip("cannot make a folder read-only here (root without chattr +i)")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=False, capture_output=True)
        folder.chmod(0o755)


def test_read_only_run_folder(scratch: Path, capfd: pytest.CaptureFixture[str]) -> None:
    run = scratch / "run"
    before = tree_digest(run)
    with _read_only(run):
        code, lines = run_cli(_train()(scratch), capfd)
    assert_one_line(code, lines, f"--job.dump_folder {run} cannot be written")
    assert tree_digest(run) == before


def test_locked_run_folder(scratch: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # The lock a running run holds, taken here with the same function (flock: another open
    # file description of the lock file, as another process would have).
    run = scratch / "run"
    config = Config()
    config.job.dump_folder = str(run)
    with hold_run_folder(config):
        held = tree_digest(run)
        code, lines = run_cli(_train()(scratch), capfd)
        assert tree_digest(run) == held
    assert_one_line(code, lines, f"run folder {run} is in use by another run (pid {os.getpid()}")
    assert not (run / ".lock").exists()  # let go: the folder is as it was


# --nproc 2: the launcher's own checks, and an error one rank meets while the other waits in a
# collective (it then fails too, on the lost peer): one line either way, printed once.
NPROC_ROWS: dict[str, Row] = {
    "mesh": Row(_train("--parallelism.dp_shard=2", "--parallelism.tp=2"), "≠ world size 2"),
    "data_empty": Row(_train("--data.path={tmp}/data/empty.txt"), "empty.txt is empty"),
    "one_rank_meets_a_bad_record": Row(
        _train("--data.path={tmp}/data/null_late.jsonl"),
        "null_late.jsonl, line 5: 'text' is None, not text",
        started=True,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def nproc_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[Path, subprocess.Popen[bytes]]]]:
    """Each --nproc row, started in a subprocess before the module's first test; name →
    (scratch folder, process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = {}
    for name, row in NPROC_ROWS.items():
        scratch = tmp_path_factory.mktemp(f"nproc_{name}")
        _make_data(scratch / "data")
        lines = [_RECORD] * 12
        lines[4] = '{"text": null}'  # line 5: the rank reading even lines meets it
        _write(scratch / "data" / "null_late.jsonl", "\n".join(lines) + "\n")
        _existing_run(scratch / "run")
        (scratch / "before.json").write_text(json.dumps(tree_digest(scratch / "run")))
        argv = row.args(scratch)
        cmd = [sys.executable, "-m", "tetrad.cli", argv[0], "--nproc=2", *argv[1:]]
        with (scratch / "stderr.txt").open("wb") as err:
            started[name] = (
                scratch,
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO),
            )
    yield started
    for _, process in started.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("name", list(NPROC_ROWS))
def test_bad_input_nproc(
    name: str, nproc_runs: dict[str, tuple[Path, subprocess.Popen[bytes]]]
) -> None:
    scratch, process = nproc_runs[name]
    code = process.wait(timeout=240)
    lines = [line for line in (scratch / "stderr.txt").read_text().splitlines() if line.strip()]
    assert_one_line(code, lines, NPROC_ROWS[name].expect)
    before = json.loads((scratch / "before.json").read_text())
    after = tree_digest(scratch / "run")
    if not NPROC_ROWS[name].started:
        assert after == before
    else:
        changed = {path for path in after if before.get(path) != after[path]}
        logs = {f"logs/{prefix}rank{r}.jsonl" for prefix in ("", "phases_") for r in (0, 1)}
        assert changed <= {"config.toml", *logs}, changed
