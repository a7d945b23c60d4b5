"""Every collective of a short PP 2 × CP 2 run (FSDP over the CP ranks, checkpointing on) gets
tensors on the trainer's device and no host tensor made without a device: the rule NCCL
enforces, checked on CPU (see ``collective_guard``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_RUN


@pytest.mark.slow
def test_every_collective_gets_device_tensors(tmp_path: Path) -> None:
    args = [
        *TINY_RUN,
        "--training.steps=2",
        "--parallelism.pp=2",
        "--parallelism.cp=2",
        "--checkpoint.enable",
        "--checkpoint.interval=2",
        f"--job.dump_folder={tmp_path / 'run'}",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    cmd += ["tests/distributed/collective_devices_worker.py", str(tmp_path), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    for rank in range(4):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # The guard bites: the host scalar is caught, the device one is not.
        assert report["self_check"] == ["c10d.all_reduce"], rank
        assert report["violations"] == [], (rank, report["violations"][:3])
        calls = Counter(report["calls"])
        # It saw the collectives that matter: the loss's token count over dp×cp, context
        # parallel's K/V all-gather, FSDP's all-gathers, pipeline sends, checkpoint objects.
        assert calls["c10d.all_reduce"] >= 2, calls
        assert calls["funcol.all_gather_single"] >= 1, calls
        assert calls["c10d.all_gather_single"] >= 1, calls
        assert calls["c10d.reduce_scatter_single"] >= 1, calls
        assert calls["c10d.batch_isend_irecv"] + calls["c10d.isend"] >= 1, calls
        assert calls["c10d.all_gather_object"] + calls["c10d.broadcast_object_list"] >= 1, calls
