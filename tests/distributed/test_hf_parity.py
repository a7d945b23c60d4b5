"""Hugging Face models under every parallelism against a single-process run of the same global
batch: pretrained weights loaded into the sharded parameters (each rank its own slices), then
loss and gradient norm per step within RTOL and every parameter's step-1 gradient (read back
from the checkpoints) within GRAD_RTOL, as tests/distributed/test_parity.py does for llama3.

Qwen3 (grouped-query attention, per-head q/k norms) runs every layout; Qwen2 (q/k/v biases),
Mistral and Llama (with context parallel) run tensor parallel, where their module roles set
the plan.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import REPO, TINY_RUN
from tests.distributed.test_parity import (
    FLOAT8_GRAD_NORM_RTOL,
    FLOAT8_RTOL,
    GRAD_RTOL,
    RTOL,
    assert_gradient_parity,
    assert_metrics_parity,
    reference,
    train,
)

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("make_tiny", REPO / "scripts/make_tiny_hf_model.py")
assert _spec is not None and _spec.loader is not None
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

TP2 = ["--parallelism.tp=2", "--parallelism.dp_shard=1"]
# (family, nproc, reference dp, layout)
CASES = {
    "qwen3_fsdp2": ("qwen3", 2, 2, ["--parallelism.dp_shard=2"]),
    "qwen3_tp2": ("qwen3", 2, 1, TP2),
    "qwen3_fsdp2_tp2": ("qwen3", 4, 2, ["--parallelism.tp=2", "--parallelism.dp_shard=2"]),
    "qwen3_pp2": ("qwen3", 2, 1, ["--parallelism.pp=2", "--parallelism.dp_shard=1"]),
    "qwen2_tp2": ("qwen2", 2, 1, TP2),
    "mistral_tp2": ("mistral", 2, 1, TP2),
    # Context parallel all-gathers K/V inside HF's own SDPA call, here under TP as well.
    "llama_cp2_tp2": ("llama", 4, 1, ["--parallelism.cp=2", *TP2]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    families = {family for family, *_ in CASES.values()}
    return {f: make_tiny.make_tiny_hf_model(root / f, f) for f in sorted(families)}


@pytest.mark.parametrize("name", list(CASES))
def test_hf_layout_matches_single_process(
    name: str, folders: dict[str, Path], tmp_path: Path, tmp_path_factory
) -> None:
    family, nproc, dp, layout = CASES[name]
    model = ["--model.name=hf", f"--model.hf_path={folders[family]}"]
    train(tmp_path, None, *model, *layout, nproc=nproc)
    want = reference(tmp_path_factory, None, dp, 1, *model)
    assert_metrics_parity(tmp_path, want, rtol=RTOL)
    assert_gradient_parity(tmp_path, want, grad_rtol=GRAD_RTOL)


def test_float8_tensor_parallel_matches_single_process(
    folders: dict[str, Path], tmp_path: Path, tmp_path_factory
) -> None:
    """The HF plan's float8 TP styles, on Qwen2's biased q/k/v projections too (tensorwise; no
    sequence parallel, whose float8 all-gathers gloo cannot carry)."""
    model = ["--model.name=hf", f"--model.hf_path={folders['qwen2']}", "--float8.enable"]
    layout = [*TP2, "--parallelism.enable_sequence_parallel=false"]
    train(tmp_path, None, *model, *layout, nproc=2)
    log = (tmp_path / "logs" / "rank1.jsonl").read_text()
    assert "float8 tensorwise: 14 linears converted" in log
    want = reference(tmp_path_factory, None, 1, 1, *model)
    assert_metrics_parity(tmp_path, want, rtol=FLOAT8_RTOL, grad_norm_rtol=FLOAT8_GRAD_NORM_RTOL)


def test_export_after_sharded_training_loads_in_transformers(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """FSDP 2 × TP 2 training, then an HF export gathered from the 2-D sharded parameters:
    transformers loads it and computes the logits the sharded model computed."""
    worker = REPO / "tests/distributed/hf_export_worker.py"
    layout = ["--parallelism.tp=2", "--parallelism.dp_shard=2", "--training.steps=2"]
    model = ["--model.name=hf", f"--model.hf_path={folders['qwen3']}"]
    args = [*TINY_RUN, *model, *layout, f"--job.dump_folder={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    result = subprocess.run(
        [*cmd, str(worker), str(tmp_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        got = exported(torch.arange(128).reshape(2, 64)).logits
    # The same weights; only tensor parallel's split matmuls sum in another order.
    torch.testing.assert_close(got, torch.load(tmp_path / "logits.pt"), rtol=1e-5, atol=1e-5)
    original = transformers.AutoModelForCausalLM.from_pretrained(folders["qwen3"]).eval()
    with torch.no_grad():
        assert (original(torch.arange(128).reshape(2, 64)).logits - got).abs().max() > 1e-3
