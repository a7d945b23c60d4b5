"""`tetrad estimate` against the measured peak: the estimate (fake tensors on a fake process
group) of a rank's training-step peak within 10% of the resident memory that the same steps add
on real tensors in real processes (1 process, and FSDP over 2), fp32 on CPU.

Why RSS is a fair reference: it is the kernel's count of the pages the process touched, so it
holds every byte the real kernels, autograd, the optimizer and gloo's collectives allocated,
independently of the tracker's bookkeeping; glibc's malloc is told to serve blocks over 64 KiB
with mmap and to return freed memory at once (MALLOC_*_THRESHOLD_), so freed tensors leave the
count as they leave the tracker's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tetrad.config import ConfigError, load_config
from tetrad.plan.dry_run import tokenizer_vocab_size
from tetrad.plan.estimate import scaled_peak, step_peak
from tetrad.plan.fake_world import fake_world

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "distributed" / "estimate_worker.py"
# Activations are most of the ~0.35 GB peak, so the interpreter's own noise (~8 MB) stays small.
ARGS = [
    "--model.flavor=debug",
    "--training.seq_len=512",
    "--training.local_batch_size=2",
    "--training.mixed_precision_param=float32",
]


def measured_peak(tmp_path: Path, nproc: int) -> int:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),  # the worker imports this checkout's tetrad
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launch, str(WORKER), str(tmp_path), *ARGS]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(json.loads((tmp_path / "rank0.json").read_text())["peak_bytes"])


@pytest.mark.parametrize("world_size", [1, 2], ids=["one_process", "fsdp2"])
def test_estimate_within_10_percent_of_measured_peak(world_size: int, tmp_path: Path) -> None:
    config = load_config(ARGS)
    with fake_world(0, world_size):
        estimate = sum(
            step_peak(config, world_size, vocab_size=tokenizer_vocab_size(config)).values()
        )
    measured = measured_peak(tmp_path, world_size)
    assert estimate == pytest.approx(measured, rel=0.10), (estimate, measured)


def test_scaled_estimate_equals_the_whole_model() -> None:
    """The 6-block model's peak, extrapolated from 2 and 3 blocks, under FSDP 2 × TP 2 (bf16
    compute, selective activation checkpointing), against building all 6."""
    config = load_config(
        [
            *ARGS[:-1], "--parallelism.tp=2", "--activation_checkpoint.mode=selective",
            "--training.mixed_precision_param=bfloat16",
        ]
    )  # fmt: skip
    vocab_size = tokenizer_vocab_size(config)
    scaled = scaled_peak(config, 4, 0, vocab_size=vocab_size)
    with fake_world(0, 4):
        whole = step_peak(config, 4, vocab_size=vocab_size)
    assert scaled == pytest.approx(whole, rel=0.01)


def test_a_mixture_of_experts_is_refused_in_one_line() -> None:
    """Routing's data-dependent shapes cannot run on fake tensors: one line, pointing to the
    dry run, instead of a fake-tensor traceback."""
    config = load_config(["--model.name=qwen3_moe", "--model.flavor=tiny"])
    with (
        fake_world(0, 2),
        pytest.raises(ConfigError, match=r"mixture of experts \(tiny\).*--dry-run"),
    ):
        step_peak(config, 2, vocab_size=tokenizer_vocab_size(config))
