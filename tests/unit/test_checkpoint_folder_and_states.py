"""Checkpoint pieces in one process: the train state's keys, the choice of the checkpoint a run
starts from, and a failure to finish a save surfacing from save() and wait()."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from tetrad.components.checkpoint import CheckpointManager
from tetrad.components.checkpoint_folder import (
    read_metadata,
    resume_source,
    will_load_model,
    write_complete,
)
from tetrad.components.checkpoint_states import LoadableTrainState, ModelState, TrainState
from tetrad.config.job_config import CheckpointConfig
from tetrad.errors import CheckpointError


def _save(path: Path, states: dict[str, Any], *, step: int = 2) -> Path:
    """A complete checkpoint of ``states`` at ``path`` (written by DCP without a process group)."""
    tmp = path.with_name(path.name + ".tmp")
    dcp.save(states, checkpoint_id=str(tmp))
    write_complete(tmp, path, step=step, names=sorted(states))
    return path


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
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = CheckpointConfig(enable=True, interval=1, async_mode=async_mode)
    return CheckpointManager(
        config, folder, model_parts=[model], optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        dataloader=_Data(), train_state=TrainState(), total_steps=3,
    )  # fmt: skip


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_a_save_that_cannot_be_finished_raises(
    tmp_path: Path, process_group: None, async_mode: Literal["disabled", "async"]
) -> None:
    """A file where step-2's folder must go: the rename fails after the shards are written. The
    error surfaces from save() (sync) or from wait() and the next save (async), never lost."""
    manager = _manager(tmp_path, async_mode)
    manager.save(1)
    manager.wait()
    assert (tmp_path / "step-1").is_dir()
    (tmp_path / "step-2").write_text("in the way")
    if async_mode == "disabled":
        with pytest.raises(NotADirectoryError):
            manager.save(2)
        return
    manager.save(2)  # returns once the state is copied; the error comes later
    with pytest.raises(NotADirectoryError):
        manager.wait()
    manager.save(3)
    manager.wait()  # the failure was reported once; later saves go on
    assert (tmp_path / "step-3").is_dir()
    manager.save(2)
    with pytest.raises(NotADirectoryError):
        manager.save(3)  # the next save reports the one before
