"""Hugging Face safetensors in and out of sharded models, checked by transformers itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tetrad.components.hf_checkpoint import load_hf_weights, save_hf_weights
from tetrad.errors import CheckpointError

transformers = pytest.importorskip("transformers")
from tests.distributed.hf_weights_worker import SameKeys  # noqa: E402


def tiny_llama(folder: Path, hidden: int = 64) -> transformers.PreTrainedModel:
    """A 2-block Llama saved as a sharded (indexed) safetensors folder."""
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size="100KB")
    return model


def logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    tokens = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "stages"])
def test_sharded_load_and_export_round_trip(tmp_path: Path, mode: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    original = tiny_llama(src)
    assert (src / "model.safetensors.index.json").is_file()
    worker = REPO / "tests/distributed/hf_weights_worker.py"
    cmd = ["torchrun", "--standalone", "--nproc-per-node=2", str(worker), mode, str(src), str(dst)]
    cmd[0:1] = [sys.executable, "-m", "torch.distributed.run"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # split by size, and by stage
    assert not dst.with_name("dst.tmp").exists()
    exported = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    assert torch.equal(logits(exported), logits(original))


def test_single_file_export_reads_back_exactly(tmp_path: Path) -> None:
    original = tiny_llama(tmp_path / "src")
    save_hf_weights(original, tmp_path / "dst", SameKeys(original.config))
    assert (tmp_path / "dst" / "model.safetensors").is_file()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert torch.equal(logits(exported), logits(original))


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    original = tiny_llama(tmp_path / "src")
    adapter = SameKeys(original.config)
    with pytest.raises(CheckpointError, match=r"does not exist$"):
        load_hf_weights(original, tmp_path / "missing", adapter)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"holds no model.safetensors"):
        load_hf_weights(original, tmp_path / "empty", adapter)
    wider = tiny_llama(tmp_path / "wide", hidden=128)
    with pytest.raises(
        CheckpointError, match=r"'model.embed_tokens.weight' has shape \[256, 64\], "
    ):
        load_hf_weights(wider, tmp_path / "src", adapter)
    before = sorted(p.name for p in (tmp_path / "src").iterdir())
    with pytest.raises(CheckpointError, match=r"already exists"):
        save_hf_weights(original, tmp_path / "src", adapter)
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == before
