"""Weights & Biases in offline mode (a local run folder, no network), read back from the files
wandb wrote, with wandb's own protobuf record type: the records of metrics.jsonl at the same
steps, the config, one W&B run across a resume that redoes steps; and the one-line error when
wandb is not installed."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tomllib
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train
from tetrad.components.metrics import MetricsLogger
from tetrad.components.wandb_sink import WandbSink
from tetrad.config.job_config import MetricsConfig

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _wandb_env(home: Path) -> dict[str, str]:
    """Offline, quiet, and every file wandb writes outside the run folder kept under ``home``."""
    folders = {name: str(home / name) for name in ("WANDB_DIR", "WANDB_CONFIG_DIR")}
    return {**OFFLINE, **folders, "WANDB_CACHE_DIR": str(home / "cache")}


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file: W&B's 7-byte header, then LevelDB's log format (32 KiB
    blocks of chunks: CRC-32 of type and data, length, type full/first/middle/last), each whole
    record a ``wandb_internal_pb2.Record``. Every CRC is checked, so a misread fails here."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at {pos}"
        pending += chunk
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def offline_runs(dump_folder: Path) -> list[Path]:
    """The .wandb files of the folder's offline runs, oldest first."""
    return sorted((dump_folder / "wandb").glob("offline-run-*/run-*.wandb"))


def history(path: Path) -> dict[int, dict[str, Any]]:
    """Step → the values logged at it, less W&B's own keys (``_step``, ``_runtime``, ...)."""
    rows: dict[int, dict[str, Any]] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in
                     record.history.item}  # fmt: skip
            assert record.history.step.num not in rows, "a step logged twice"
            rows[record.history.step.num] = {k: v for k, v in items.items() if k[0] != "_"}
    return rows


def run_of(path: Path) -> Any:
    return next(r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run")


def jsonl_by_step(dump_folder: Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl's records merged per step (a validation record shares its step)."""
    rows: dict[int, dict[str, Any]] = {}
    for record in read_metrics(dump_folder):
        rows.setdefault(int(record["step"]), {}).update(
            {k: v for k, v in record.items() if k != "step"}
        )
    return rows


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One 4-step run logging to W&B offline, with a peak far too low (MFU way above 100%)."""
    folder = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as env:
        for name, value in _wandb_env(folder / "home").items():
            env.setenv(name, value)
        result = run_train(
            folder / "run", *TINY_RUN, "--metrics.enable_wandb", "--metrics.wandb_mode=offline",
            "--metrics.peak_tflops=1e-6", "--metrics.wandb_run_name=tiny-offline",
        )  # fmt: skip
    return folder / "run", result.stdout + result.stderr


def test_wandb_holds_the_records_of_metrics_jsonl_and_the_config(
    offline_run: tuple[Path, str],
) -> None:
    run, _ = offline_run
    [path] = offline_runs(run)
    expected = jsonl_by_step(run)
    assert sorted(expected) == [1, 2, 3, 4]
    assert history(path) == expected  # the same keys and values at the same steps
    info = run_of(path)
    assert (info.project, info.display_name) == ("tetrad", "tiny-offline")
    config = {u.key: json.loads(u.value_json) for u in info.config.update if u.key != "_wandb"}
    assert config == tomllib.loads((run / "config.toml").read_text())
    assert json.loads((run / "wandb" / "tetrad-run.json").read_text()) == {
        "id": info.run_id,
        "last_step": 4,
    }


def test_mfu_above_100_percent_is_said_once_with_its_fix(offline_run: tuple[Path, str]) -> None:
    run, output = offline_run
    assert all(r["mfu"] > 100 for r in read_metrics(run))  # a 1e-6 TFLOP/s peak
    assert "peak 1e-06 TFLOP/s set by --metrics.peak_tflops" in output
    assert output.count("MFU") == 4 + 1, output  # four step lines, one warning
    assert "set its peak with --metrics.peak_tflops" in output


def test_a_resume_continues_the_wandb_run_without_logging_a_step_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three starts in one folder through the trainer's MetricsLogger: steps 1-4; a resume
    after step 2 that redoes 3-4 and goes on to 5; a start from step 0 that replaces the run."""
    import wandb

    for name, value in _wandb_env(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    folder = tmp_path / "run"
    folder.mkdir()
    config = MetricsConfig(enable_wandb=True, wandb_mode="offline")

    def start(after_step: int, steps: range, loss_offset: float) -> None:
        sink = WandbSink(config, folder, {"training": {"steps": steps.stop - 1}})
        metrics = MetricsLogger(
            dump_folder=folder, device=torch.device("cpu"), flops_per_token=1, peak_tflops=1.0,
            enable_tensorboard=False, write=True, wandb=sink,
        )  # fmt: skip
        metrics.start(after_step=after_step)
        for step in steps:
            metrics.add_tokens(10)
            metrics.log(
                step,
                loss=loss_offset + step,
                grad_norm=1.0,
                lr=0.1,
                skipped_steps=0,
                data_wait_s=0.0,
            )
        metrics.close()

    try:
        start(0, range(1, 5), loss_offset=0.0)
        start(2, range(3, 6), loss_offset=0.5)
        resumed_jsonl = jsonl_by_step(folder)
        start(0, range(1, 2), loss_offset=0.0)
    finally:
        wandb.teardown()  # stops the wandb-core service this process started; its files are whole
    by_start = sorted(
        offline_runs(folder), key=lambda path: run_of(path).start_time.ToNanoseconds()
    )
    first, resumed, replaced = (run_of(path).run_id for path in by_start)
    assert first == resumed != replaced  # a resume continues the W&B run, step 0 starts anew
    # W&B keeps the first start's steps 3 and 4; metrics.jsonl holds the redone ones.
    losses = [{s: r["loss"] for s, r in history(path).items()} for path in by_start]
    assert losses == [{1: 1, 2: 2, 3: 3, 4: 4}, {5: 5.5}, {1: 1}]
    assert {s: r["loss"] for s, r in resumed_jsonl.items()} == {1: 1, 2: 2, 3: 3.5, 4: 4.5, 5: 5.5}


def test_missing_wandb_is_a_one_line_error_before_anything_is_written(tmp_path: Path) -> None:
    """wandb made unimportable the way Python documents it (``sys.modules[name] = None``)."""
    run = tmp_path / "run"
    argv = ["train", f"--job.dump_folder={run}", *TINY_RUN, "--metrics.enable_wandb"]
    code = f"import sys; sys.modules['wandb'] = None; from tetrad.cli import main; main({argv!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, **OFFLINE},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "tetrad: error: --metrics.enable_wandb needs wandb: pip install 'tetrad[tracking]'"
    ]
    assert not run.exists()
