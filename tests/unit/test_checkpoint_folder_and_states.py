"""Checkpoint pieces in one process: the train state's keys, the choice of the checkpoint a run
starts from, content verification and safe metadata, and a failed save (a file in the way, a
full disk) surfacing from save() and wait() as one line, with the previous checkpoint intact."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import resource
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from tetrad.components.checkpoint import CheckpointManager
from tetrad.components.checkpoint_folder import (
    COMPLETE,
    checkpoint_problem,
    read_metadata,
    recorded_crc32,
    resume_source,
    will_load_model,
    write_complete,
)
from tetrad.components.checkpoint_states import LoadableTrainState, ModelState, TrainState
from tetrad.components.checkpoint_storage import ChecksumWriter, SafeReader, safe_load
from tetrad.config.job_config import CheckpointConfig
from tetrad.errors import CheckpointError, RunStopped


def _save(path: Path, states: dict[str, Any], *, step: int = 2, checksums: bool = True) -> Path:
    """A complete checkpoint of ``states`` at ``path`` (written by DCP without a process group;
    without ``checksums``, as tetrad wrote them before it recorded any)."""
    tmp = path.with_name(path.name + ".tmp")
    writer = ChecksumWriter(tmp) if checksums else dcp.FileSystemWriter(tmp)
    dcp.save(states, storage_writer=writer)
    write_complete(tmp, path, step=step, names=sorted(states))
    return path


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the checkpoint of a CPU machine")
def test_train_state_without_cuda_saves_an_empty_cuda_rng(tmp_path: Path) -> None:
    saved = TrainState()
    saved.step, saved.tokens_seen = 7, 896
    torch.manual_seed(3)
    path = _save(tmp_path / "step-7", {"train_state": saved})
    md = read_metadata(path).state_dict_metadata["train_state.cuda_rng"]
    assert tuple(md.size) == (0,)  # the key is there on every machine
    expected = torch.rand(4)  # what the resumed run must draw next
    torch.manual_seed(0)
    fresh = TrainState()
    dcp.load({"train_state": fresh}, checkpoint_id=str(path))
    assert (fresh.step, fresh.tokens_seen) == (7, 896)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("cuda_rng", [torch.arange(16, dtype=torch.uint8), None])
def test_train_state_loads_another_machines_cuda_rng(tmp_path: Path, cuda_rng: Any) -> None:
    """A GPU machine's checkpoint (a CUDA RNG state of its size) or one written before the key
    was always saved loads into this machine's train state."""
    state = {"step": 5, "tokens_seen": 640, "rng": torch.get_rng_state()}
    if cuda_rng is not None:
        state["cuda_rng"] = cuda_rng
    path = _save(tmp_path / "step-5", {"train_state": state})
    fresh = TrainState()
    target = LoadableTrainState(fresh, read_metadata(path))
    dcp.load({"train_state": target}, checkpoint_id=str(path))
    assert (fresh.step, fresh.tokens_seen) == (5, 640)


def test_resume_source_and_will_load_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = nn.Linear(4, 4)
    _save(run / "step-2", {"model": ModelState(model)})
    _save(run / "step-4", {"train_state": TrainState()}, step=4)
    (run / "step-6.tmp").mkdir()  # a save that did not finish: skipped
    final = _save(tmp_path / "final", {"model": ModelState(model), "train_state": TrainState()})

    enabled = CheckpointConfig(enable=True)
    assert resume_source(enabled, run) == run / "step-4"
    assert not will_load_model(enabled, run / "step-4")  # no model state in it
    chosen = dataclasses.replace(enabled, load_step=2)
    assert resume_source(chosen, run) == run / "step-2"
    assert will_load_model(chosen, run / "step-2")
    excluded = dataclasses.replace(chosen, exclude_from_loading=["model"])
    assert not will_load_model(excluded, run / "step-2")
    with pytest.raises(CheckpointError, match=r"--checkpoint.load_step 3: .*it does not exist"):
        resume_source(dataclasses.replace(enabled, load_step=3), run)

    # Not named step-N, and only when the run's own folder holds no checkpoint.
    initial = CheckpointConfig(initial_load_path=str(final))
    assert resume_source(initial, run) == final  # without --checkpoint.enable
    assert resume_source(dataclasses.replace(initial, enable=True), tmp_path / "new") == final
    assert will_load_model(initial, final)
    hf = dataclasses.replace(initial, initial_load_in_hf=True)
    assert resume_source(hf, run) is None  # HF weights: the trainer's
    assert resume_source(CheckpointConfig(), run) is None
    assert not will_load_model(CheckpointConfig(), None)


def test_flipped_bytes_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every file's CRC-32 is recorded at save time: one flipped bit in a shard (sizes intact) is
    refused with the checkpoint and the file named; the untouched checkpoint before it passes,
    and one saved without checksums loads, with one warning."""
    run = tmp_path / "run"
    model = nn.Linear(64, 64)
    _save(run / "step-2", {"model": ModelState(model)})
    _save(run / "step-4", {"model": ModelState(model)}, step=4)
    recorded = recorded_crc32(run / "step-4")
    assert recorded is not None and set(recorded) == {".metadata", "__0_0.distcp"}
    assert sorted(p.name for p in (run / "step-4").iterdir()) == [
        ".metadata", COMPLETE, "__0_0.distcp",
    ]  # fmt: skip
    assert checkpoint_problem(run / "step-4", verify=True) is None
    _flip_byte(run / "step-4" / "__0_0.distcp")
    corrupt = "its file __0_0.distcp does not match the checksum recorded when it was saved"
    assert checkpoint_problem(run / "step-4") is None  # names and sizes alone do not see it
    assert corrupt in (checkpoint_problem(run / "step-4", verify=True) or "")
    enabled = CheckpointConfig(enable=True)
    with pytest.raises(CheckpointError) as error:
        resume_source(enabled, run)
    assert str(error.value) == (
        f"checkpoint {run / 'step-4'}: {corrupt} (its content is corrupt); move it out of {run} "
        f"to start from {run / 'step-2'}"
    )
    with pytest.raises(CheckpointError, match=rf"--checkpoint.load_step 4: .*: {corrupt}"):
        resume_source(dataclasses.replace(enabled, load_step=4), run)
    assert resume_source(dataclasses.replace(enabled, load_step=2), run) == run / "step-2"

    old = _save(tmp_path / "old" / "step-2", {"model": ModelState(model)}, checksums=False)
    assert recorded_crc32(old) is None
    with caplog.at_level(logging.WARNING):
        assert resume_source(enabled, old.parent) == old
    warnings = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"checkpoint {old} records no checksums (saved before tetrad recorded them, or by "
        "another tool): loading it unverified"
    ]


class _RunsCode:
    """What a crafted .metadata holds: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def test_metadata_that_runs_code_is_refused_unread(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    path = _save(tmp_path / "step-2", {"model": ModelState(model)})
    assert read_metadata(path).state_dict_metadata.keys() == {"model.weight", "model.bias"}
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    assert pickle.loads((path / ".metadata").read_bytes()) == 0 and marker.exists()  # it would
    marker.unlink()
    refused = "its .metadata names posix.system, which no DCP metadata holds: refused unread"
    assert refused in (checkpoint_problem(path) or "")
    with pytest.raises(CheckpointError, match=f"checkpoint {path}: {refused}"):
        read_metadata(path)
    with pytest.raises(CheckpointError, match=f"--checkpoint.initial_load_path {path}: {refused}"):
        resume_source(CheckpointConfig(initial_load_path=str(path)), tmp_path / "run")
    with pytest.raises(CheckpointException, match="refused unread"):  # DCP's load, our reader
        dcp.load({"model": ModelState(model)}, storage_reader=SafeReader(path))
    assert not marker.exists()


def test_values_that_run_code_are_refused_unread(tmp_path: Path) -> None:
    """A non-tensor value of a checkpoint (DCP keeps them as torch.save pickles) that would run
    code: DCP's own planner runs it; ours loads plain values only and refuses it."""
    marker = tmp_path / "pwned"
    path = _save(tmp_path / "step-2", {"state": {"step": 3, "x": _RunsCode(marker)}})
    match = r"'state.x' holds a pickled object other than plain values"
    with pytest.raises(CheckpointError, match=match):
        safe_load({"state": {"step": 0, "x": 0}}, path, no_dist=True)
    assert not marker.exists()
    dcp.load({"state": {"step": 0, "x": 0}}, storage_reader=SafeReader(path))
    assert marker.exists()  # what the default planner does with it
    safe = {"state": {"step": 0}}
    safe_load(safe, path, no_dist=True)
    assert safe == {"state": {"step": 3}}


class _Data:
    """The smallest dataloader state a CheckpointManager takes."""

    def state_dict(self) -> dict[str, Any]:
        return {"dp_world_size": 1, "dp_rank_0": {"position": 0}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-process gloo group, always destroyed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _manager(folder: Path, async_mode: Literal["disabled", "async"]) -> CheckpointManager:
    model = nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = CheckpointConfig(enable=True, interval=1, async_mode=async_mode)
    return CheckpointManager(
        config, folder, model_parts=[model], optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        dataloader=_Data(), train_state=TrainState(), total_steps=3,
    )  # fmt: skip


@contextlib.contextmanager
def _files_limited_to(size: int) -> Iterator[None]:
    """A real write error (EFBIG, as from a full disk) for any write of this process past
    ``size`` bytes of a file: RLIMIT_FSIZE, with SIGXFSZ ignored so the write fails instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
@pytest.mark.parametrize("fault", ["file_in_the_way", "full_disk"])
def test_a_failed_save_stops_with_one_line_and_leaves_the_previous(
    tmp_path: Path,
    process_group: None,
    async_mode: Literal["disabled", "async"],
    fault: str,
) -> None:
    """A file where step-2's folder must go (the rename fails after the shards are written), or
    a shard that cannot be written (a real OS write error): RunStopped with one line naming
    step-2 and the OS error, from save() (sync) or wait() (async); no step-2.tmp left; step-1
    byte for byte as it was and verified; later saves go on."""
    manager = _manager(tmp_path, async_mode)
    manager.save(1)
    manager.wait()
    step1 = {p.name: p.read_bytes() for p in (tmp_path / "step-1").iterdir()}
    shard = len(step1["__0_0.distcp"])
    if fault == "file_in_the_way":
        (tmp_path / "step-2").write_text("in the way")
        limit, reason = contextlib.nullcontext(), "[Errno 20] Not a directory"
    else:
        limit, reason = _files_limited_to(shard // 2), "[Errno 27] File too large (rank 0)"
    with limit, pytest.raises(RunStopped) as stopped:
        manager.save(2)  # async: returns once the state is copied; the error comes later
        manager.wait()
    assert str(stopped.value).startswith(f"could not save checkpoint {tmp_path / 'step-2'}: ")
    assert reason in str(stopped.value) and "\n" not in str(stopped.value)
    assert str(stopped.value).endswith("; the checkpoints before it are intact")
    assert not (tmp_path / "step-2.tmp").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "step-1").iterdir()} == step1
    assert checkpoint_problem(tmp_path / "step-1", verify=True) is None
    (tmp_path / "step-2").unlink(missing_ok=True)
    manager.save(2)
    manager.wait()  # the failure was reported once; later saves go on
    assert checkpoint_problem(tmp_path / "step-2", verify=True) is None
    if async_mode == "async":  # the next save reports the one before
        shutil.rmtree(tmp_path / "step-2")
        (tmp_path / "step-2").write_text("in the way")
        manager.save(2)
        with pytest.raises(RunStopped, match="Not a directory"):
            manager.save(3)
