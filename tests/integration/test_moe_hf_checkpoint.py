"""Qwen3-MoE in the Hugging Face format end to end: a run (1 process and FSDP 2) started from a
``transformers``-made folder reports transformers' loss on its first batch; a trained model
exports to a folder that ``AutoModelForCausalLM`` loads with tetrad's logits; a folder missing
an expert or holding another expert count or size is a one-line error naming the key."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import TINY_RUN, read_metrics, run_train
from tetrad.components.hf_checkpoint import load_hf_weights, save_hf_weights
from tetrad.config.job_config import DataConfig
from tetrad.data import build_dataloader, build_tokenizer
from tetrad.errors import CheckpointError
from tetrad.models.moe import MoEConfig, MoETransformer, Qwen3MoeStateDictAdapter, qwen3_moe_spec

transformers = pytest.importorskip("transformers")

RTOL = 1e-5  # fp32, two implementations of the same model
# Logits also get an absolute floor: both sum over experts in their own order, so the largest
# differences (~1e-5 at 1e-6 of the largest logit) sit on logits of any size.
LOGITS_ATOL = 1e-4
RUN = [*TINY_RUN, "--model.name=qwen3_moe", "--training.steps=1", "--checkpoint.initial_load_in_hf"]


def tiny_config(**changes: object) -> MoEConfig:
    """qwen3_moe tiny at the default tokenizer's vocabulary; routing biases off (HF has none)."""
    config = qwen3_moe_spec.config_for("tiny", vocab_size=build_tokenizer(None).vocab_size)
    return dataclasses.replace(config, bias_update_rate=0.0, **changes)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny Qwen3-MoE made and saved by transformers (random weights, norms and router moved
    off their 1s and 0s), and the model itself."""
    hf_config = transformers.Qwen3MoeConfig(**Qwen3MoeStateDictAdapter(tiny_config()).hf_config())
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # logits of std ~1: every expert's rows move the loss
            p.normal_(mean=1.0 if p.dim() == 1 else 0.0, std=0.2)
    folder = tmp_path_factory.mktemp("qwen3moe-hf")
    hf.save_pretrained(folder)
    return folder, hf


def hf_loss(hf: torch.nn.Module, dp_world_size: int) -> float:
    """transformers' mean cross-entropy over the first batch of every data-parallel rank."""
    total, count = 0.0, 0
    for rank in range(dp_world_size):
        loader = build_dataloader(
            DataConfig(), tokenizer=build_tokenizer(None), seq_len=64, batch_size=2,
            dp_rank=rank, dp_world_size=dp_world_size,
        )  # fmt: skip
        batch = next(iter(loader))
        with torch.no_grad():
            logits = hf(batch.inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="sum")
        total += loss.item()
        count += batch.labels.numel()
    return total / count


@pytest.mark.parametrize("nproc", [1, 2])
def test_run_from_transformers_folder_reports_its_loss(
    hf_folder: tuple[Path, torch.nn.Module], tmp_path: Path, nproc: int
) -> None:
    """Under FSDP 2 each rank holds (and reads) 4 of the 8 experts of each layer."""
    folder, hf = hf_folder
    run_train(tmp_path, *RUN, f"--checkpoint.initial_load_path={folder}", nproc=nproc)
    assert read_metrics(tmp_path)[0]["loss"] == pytest.approx(hf_loss(hf, nproc), rel=RTOL)


def test_trained_model_exports_to_transformers(
    hf_folder: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    folder, _ = hf_folder
    config = tiny_config()
    adapter = Qwen3MoeStateDictAdapter(config)
    model = MoETransformer(config)
    model.init_buffers()
    load_hf_weights(model, folder, adapter)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(
        0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1)
    )
    for _ in range(2):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_hf_weights(model, tmp_path / "export", adapter)
    with (
        safe_open(folder / "model.safetensors", "pt") as f,
        safe_open(tmp_path / "export" / "model.safetensors", "pt") as g,
    ):
        assert set(g.keys()) == set(f.keys())  # transformers' own per-expert layout
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "export", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        want = model.eval()(tokens)
        torch.testing.assert_close(exported(tokens).logits, want, rtol=RTOL, atol=LOGITS_ATOL)
    back = MoETransformer(config)
    back.init_buffers()
    load_hf_weights(back, tmp_path / "export", adapter)  # the round trip is bit for bit
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())

    # Routing biases (auxiliary-loss-free balancing) have no place in the format.
    biased = Qwen3MoeStateDictAdapter(dataclasses.replace(config, bias_update_rate=0.001))
    with pytest.raises(CheckpointError, match="auxiliary-loss-free biases") as error:
        save_hf_weights(model, tmp_path / "biased", biased)
    assert "\n" not in str(error.value) and not (tmp_path / "biased.tmp").exists()


def test_missing_expert_or_other_expert_shape_is_one_line(
    hf_folder: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    folder, _ = hf_folder
    config = tiny_config()
    gone = "model.layers.1.mlp.experts.7.up_proj.weight"
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with safe_open(folder / "model.safetensors", "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != gone}  # noqa: SIM118 - not a dict
    save_file(kept, tmp_path / "model.safetensors")
    cases = [
        (tmp_path, config, f"1 model tensors are missing from it (e.g. {gone})"),
        (
            folder,
            dataclasses.replace(config, num_experts=6),
            "12 checkpoint tensors have no place in the model "
            "(e.g. model.layers.0.mlp.experts.6.down_proj.weight)",
        ),
        (
            folder,
            dataclasses.replace(config, moe_hidden_dim=16),
            "'model.layers.0.mlp.experts.0.gate_proj.weight'.. stack to shape [8, 32, 64], "
            "the model expects [8, 16, 64] for 'layers.0.feed_forward.experts.w1'",
        ),
    ]
    for src, model_config, message in cases:
        model = MoETransformer(model_config)
        model.init_buffers()
        with pytest.raises(CheckpointError) as error:
            load_hf_weights(model, src, Qwen3MoeStateDictAdapter(model_config))
        assert message in str(error.value) and "\n" not in str(error.value)


def test_export_of_a_biased_run_fails_before_training(tmp_path: Path) -> None:
    """qwen3_moe tiny moves routing biases, which the format cannot hold: --checkpoint
    .last_save_in_hf is refused at start, not after the run."""
    args = ["--model.name=qwen3_moe", "--checkpoint.enable", "--checkpoint.last_save_in_hf"]
    result = run_train(tmp_path, *TINY_RUN, *args, expect_ok=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tetrad: error: ") and "auxiliary-loss-free biases" in line
    assert not (tmp_path / "metrics.jsonl").exists()
