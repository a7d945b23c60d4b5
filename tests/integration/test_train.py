"""`tetrad train` end to end on the embedded default corpus, as a user runs it."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RUN, read_metrics, run_train
from tetrad.config import load_config
from tetrad.trainer import Trainer

METRIC_KEYS = {"step", "loss", "grad_norm", "lr", "skipped_steps", "tokens_per_sec", "tflops"}
METRIC_KEYS |= {"mfu", "memory_gib", "data_wait_share"}


def test_debug_model_learns_and_writes_its_run_folder(tmp_path: Path) -> None:
    result = run_train(
        tmp_path,
        "--training.steps=30",
        "--training.seq_len=128",
        "--training.local_batch_size=4",
        "--metrics.log_freq=1",
        "--metrics.enable_tensorboard",
    )
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert all(set(r) == METRIC_KEYS for r in records)
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    assert first > 8.5  # ≈ ln(8192) = 9.01 at initialisation
    assert last < first - 2.0, f"loss fell only from {first:.2f} to {last:.2f}"
    assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 100 for r in records[1:])
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["training"]["steps"] == 30 and config["model"]["flavor"] == "debug"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "step    30" in result.stdout
    log = [json.loads(line) for line in (tmp_path / "logs" / "rank0.jsonl").open()]
    assert any(entry["message"].startswith("step    30") for entry in log)
    assert {entry["rank"] for entry in log} == {0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.name=llama4"], "unknown --model.name 'llama4'"),
        (["--model.flavor=8b"], "did you mean '8B'?"),
        (["--data.path=/no/such/file.jsonl"], "does not exist"),
        (["--training.global_batch_size=3"], "is not a multiple of local_batch_size"),
        (["--training.seq_len=1024"], "exceeds tiny's rotary table of 512 positions"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_train(tmp_path, *TINY_RUN, *args, expect_ok=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tetrad: error: ") and message in lines[0]
    assert not (tmp_path / "metrics.jsonl").exists()


_NO_CUDA = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the error a machine without CUDA gives"
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parallelism.enable_async_tp"], "--parallelism.enable_async_tp needs --compile.enable"),
        pytest.param(
            ["--parallelism.enable_async_tp", "--compile.enable", "--parallelism.tp=2"],
            "--parallelism.enable_async_tp needs CUDA GPUs (symmetric memory), not cpu: drop it",
            marks=_NO_CUDA,
        ),
        pytest.param(
            ["--float8.enable", "--float8.recipe=mxfp8"],
            "--float8.recipe mxfp8 needs an NVIDIA Blackwell GPU (compute capability >= 10.0)",
            marks=_NO_CUDA,
        ),
        pytest.param(
            ["--parallelism.dp_shard=2", "--float8.enable", "--float8.recipe=mxfp8"],
            "--float8.recipe mxfp8 needs an NVIDIA Blackwell GPU (compute capability >= 10.0)",
            marks=_NO_CUDA,
        ),
    ],
    ids=["async_tp_without_compile", "async_tp_on_cpu", "mxfp8_on_cpu", "mxfp8_on_cpu_nproc2"],
)
def test_unsupported_option_fails_before_start(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Options the config or the device cannot serve stop before any process group starts, also
    where --nproc launches the ranks."""
    nproc = 2 if "--parallelism.dp_shard=2" in args else 1
    result = run_train(tmp_path, *TINY_RUN, *args, nproc=nproc, expect_ok=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tetrad: error: ") and message in lines[0]
    assert not (tmp_path / "logs").exists()  # logging starts right after the process group


def test_gradient_accumulation_equals_full_batch(tmp_path: Path) -> None:
    """2 micro-batches of half the sequences give the loss and gradients of the full batch."""
    config = load_config([*TINY_RUN, f"--job.dump_folder={tmp_path}", "--training.max_norm=0"])
    trainer = Trainer(config)
    try:
        batch = next(iter(trainer.dataloader))  # [2, T]
        results = []
        for micro_batches in (
            [batch],
            [batch.map(lambda x: x[:1]), batch.map(lambda x: x[1:])],
        ):
            trainer.model_parts[0].zero_grad(set_to_none=True)
            loss = trainer.forward_backward(micro_batches)
            grads = {n: p.grad.clone() for n, p in trainer.model_parts[0].named_parameters()}
            results.append((loss, grads))
        (full_loss, full_grads), (accum_loss, accum_grads) = results
        torch.testing.assert_close(accum_loss, full_loss, rtol=1e-5, atol=0)
        for name, grad in full_grads.items():
            torch.testing.assert_close(accum_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert any(g.abs().sum() > 0 for g in full_grads.values())
    finally:
        trainer.close()
