"""Packing without cross-talk: a conversation packed among others under block-causal masks has
the loss and gradients it has alone, in one process, under context parallel 2 × tensor parallel 2
(the load-balanced chunks cut the packed row at other places than the documents; the ids reach
attention through the TP plan) and under FSDP 2 × pipeline parallel 2 (the ids reach the second
stage)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_RUN
from tests.distributed.document_mask_worker import main as run_in_process

RTOL = 1e-5
"""fp32: the same sums in another order (masked-out keys add exact zeros)."""

LAYOUTS = {
    "cp2_tp2": ["--parallelism.cp=2", "--parallelism.tp=2"],
    "fsdp2_pp2": ["--parallelism.dp_shard=2", "--parallelism.pp=2"],
}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got["loss"] == pytest.approx(want["loss"], rel=RTOL), what
    assert got["grads"].keys() == want["grads"].keys(), what
    errors = {fqn: _relative_error(got["grads"][fqn], grad) for fqn, grad in want["grads"].items()}
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] < RTOL, f"{what}: {worst} gradient off by {errors[worst]:.2e}"


@pytest.mark.slow
def test_packed_conversation_matches_alone(
    tmp_path: Path, trained_weights: Callable[[str], Path]
) -> None:
    args = [
        *TINY_RUN,
        "--model.flavor=tiny_pp",
        "--data.document_mask",
        f"--checkpoint.initial_load_path={trained_weights('tiny_pp')}",
        "--checkpoint.exclude_from_loading=optimizer,lr_scheduler,dataloader,train_state",
    ]
    run_in_process(tmp_path, "single", [*args, f"--job.dump_folder={tmp_path / 'single'}"])
    single = torch.load(tmp_path / "single_rank0.pt")
    # Masks and positions matter here: without them B's loss would differ.
    assert single["plain"]["loss"] == pytest.approx(single["alone"]["loss"], rel=RTOL)
    _assert_same(single["alone"], single["plain"], "alone with masks vs plain causal")
    _assert_same(single["packed"], single["plain"], "packed vs alone")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name, layout in LAYOUTS.items():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
        cmd += ["tests/distributed/document_mask_worker.py", str(tmp_path), name, *args]
        cmd += [*layout, f"--job.dump_folder={tmp_path / name}"]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-5000:]
        parallel = torch.load(tmp_path / f"{name}_rank0.pt")
        for rank in (1, 2, 3):  # a pipeline's second stage is on ranks 2 and 3
            for case, result in torch.load(tmp_path / f"{name}_rank{rank}.pt").items():
                parallel[case]["grads"].update(result["grads"])
        for case in ("packed", "alone"):
            _assert_same(parallel[case], single["plain"], f"{name} {case} vs 1 process alone")
