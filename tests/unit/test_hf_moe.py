"""Hugging Face mixtures of experts (Qwen3-MoE, Mixtral) with their sparse-MoE blocks swapped
for tetrad's ``MoE``, checked against transformers' own models of tiny folders made here:
logits and routing, the first step's loss, FSDP 2 against one process, and exports that
transformers loads back."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train
from tests.distributed.reference import MergedBatches
from tests.unit.test_hf import load_weights, resolve
from tetrad.components.hf_checkpoint import save_hf_weights
from tetrad.config import load_config
from tetrad.errors import ConfigError
from tetrad.models.dense import training_flops_per_token
from tetrad.models.hf import (
    HFStateDictAdapter,
    check_parallelism,
    count_params,
    num_flops_per_token,
)
from tetrad.models.moe import MoE
from tetrad.models.moe.layer import sequence_balance_loss
from tetrad.trainer import Trainer

_spec = importlib.util.spec_from_file_location("make_tiny", REPO / "scripts/make_tiny_hf_model.py")
assert _spec is not None and _spec.loader is not None
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

FAMILIES = ["qwen3_moe", "mixtral"]
EXPERTS, TOP_K = 4, 2  # make_tiny's MoE shapes
RTOL = 1e-5  # fp32: only the summation order differs
RUN = [
    "--model.name=hf",
    *(arg for arg in TINY_RUN if not arg.startswith(("--model.flavor", "--training.steps"))),
    "--training.steps=2",
    "--metrics.peak_tflops=1",
]
TOKENS = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_moe")
    return {f: make_tiny.make_tiny_hf_model(root / f, f, seed=1) for f in FAMILIES}


def transformers_model(folder: Path) -> Any:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    return hf.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_swap_routes_and_computes_as_transformers(family: str, folders: dict[str, Path]) -> None:
    model = load_weights(folders[family], "--model.hf_overrides=output_router_logits=true")
    assert [type(layer.mlp) for layer in model.layers.values()] == [MoE, MoE]
    hf = transformers_model(folders[family])
    with torch.no_grad():
        got = model(TOKENS)
        out = hf(TOKENS, output_router_logits=True)
    torch.testing.assert_close(got, out.logits, rtol=RTOL, atol=RTOL)
    # Routing from transformers' own router logits: tokens per expert, and the balance loss
    # (router_aux_loss_coef × k × the per-sequence f·P averaged over layers and sequences).
    scores = [logits.float().softmax(-1) for logits in out.router_logits]  # [B·T, E] per layer
    chosen = [s.topk(TOP_K).indices for s in scores]
    want_loads = torch.stack([torch.bincount(c.flatten(), minlength=EXPERTS) for c in chosen])
    assert torch.equal(model.expert_loads(), want_loads.float())
    per_layer = [
        sequence_balance_loss(s, c, batch=2, score_func="softmax")
        for s, c in zip(scores, chosen, strict=True)
    ]
    want_aux = hf.config.router_aux_loss_coef * TOP_K * torch.stack(per_layer).mean()
    torch.testing.assert_close(model.auxiliary_loss(), want_aux, rtol=RTOL, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_active_parameters(family: str, folders: dict[str, Path]) -> None:
    model_config = resolve(folders[family])
    hf = transformers_model(folders[family])
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in hf.parameters())
    active = total - experts + experts * TOP_K // EXPERTS
    assert count_params(model_config) == {"total": total, "active": active}
    c = hf.config
    want = training_flops_per_token(active - c.vocab_size * c.hidden_size, 2, 4 * 16, 64)
    assert num_flops_per_token(model_config, 64) == want


def test_mixtral_export_round_trip(folders: dict[str, Path], tmp_path: Path) -> None:
    model = load_weights(folders["mixtral"])
    save_hf_weights(model, tmp_path / "export", HFStateDictAdapter(model.config))
    keys = []
    for folder in (folders["mixtral"], tmp_path / "export"):
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1]  # save_pretrained's names: block_sparse_moe.experts.{e}.w1 ...
    with torch.no_grad():
        got = transformers_model(tmp_path / "export")(TOKENS).logits
        torch.testing.assert_close(got, model(TOKENS), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parallelism.tp=2"], r"^--parallelism.tp 2: Qwen3MoeForCausalLM \(a mixture"),
        (["--parallelism.pp=2"], r"^--parallelism.pp 2: "),
        (["--lora.rank=4", "--lora.targets=q,gate"], r"^--lora.targets gate: "),
        (["--model.hf_overrides=hidden_act=gelu"], r"tetrad's experts are SwiGLU \(silu\)$"),
    ],
)
def test_layouts_the_swap_cannot_take(
    args: list[str], message: str, folders: dict[str, Path]
) -> None:
    folder = folders["qwen3_moe"]
    config = load_config(["--model.name=hf", f"--model.hf_path={folder}", *args])
    with pytest.raises(ConfigError, match=message):
        check_parallelism(resolve(folder, *args), config)


@pytest.fixture(scope="module")
def qwen3_moe_run(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two steps of one process on the global batch of a dp 2 run (tests/distributed/
    reference.py), the exported model and its logits."""
    folder, root = folders["qwen3_moe"], tmp_path_factory.mktemp("qwen3_moe_run")
    args = [*RUN, f"--model.hf_path={folder}"]
    config = load_config([*args, f"--job.dump_folder={root / 'one'}"])
    config.training.local_batch_size *= 2
    config.training.global_batch_size = -1
    trainer = Trainer(config)
    try:
        assert trainer.model_config.init == "pretrained"
        trainer.dataloader = MergedBatches(trainer, 2, 1, 2)  # type: ignore[assignment]
        batch = next(iter(trainer.dataloader))
        trainer.train()
        (model,) = trainer.model_parts
        save_hf_weights(model, root / "export", HFStateDictAdapter(trainer.model_config))
        model.eval()
        with torch.no_grad():
            logits = model(TOKENS)
    finally:
        trainer.close()
    return folder, root, batch, logits


def test_first_step_loss_equals_transformers(qwen3_moe_run: Any) -> None:
    folder, root, batch, _ = qwen3_moe_run
    hf = transformers_model(folder).train()
    want = hf(input_ids=batch.inputs, labels=batch.labels, shift_labels=batch.labels).loss
    first = read_metrics(root / "one")[0]
    assert first["loss"] == pytest.approx(want.item(), rel=RTOL)
    # 4 sequences × 64 tokens × 2 experts each, over 4 experts, per layer (no aux loss: HF's
    # output_router_logits is off).
    assert first["expert_load_mean"] == 4 * 64 * TOP_K / EXPERTS
    assert "aux_loss" not in first


@pytest.mark.slow
def test_fsdp2_with_activation_checkpointing_equals_one_process(
    qwen3_moe_run: Any, tmp_path: Path
) -> None:
    """The dp 2 run of the reference's batches, under FSDP with activation checkpointing (its
    recomputed forwards must not count tokens twice)."""
    folder, root, _, _ = qwen3_moe_run
    layout = ["--parallelism.dp_shard=2", "--activation_checkpoint.mode=full"]
    run_train(tmp_path, *RUN, f"--model.hf_path={folder}", *layout, nproc=2)
    got, want = read_metrics(tmp_path), read_metrics(root / "one")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=RTOL)
        for name in ("expert_load_min", "expert_load_max", "expert_load_mean"):
            assert g[name] == w[name]  # token counts summed over the ranks


def test_export_after_training_loads_in_transformers(qwen3_moe_run: Any) -> None:
    folder, root, _, logits = qwen3_moe_run
    with torch.no_grad():
        got = transformers_model(root / "export")(TOKENS).logits
        before = transformers_model(folder)(TOKENS).logits
    torch.testing.assert_close(got, logits, rtol=RTOL, atol=RTOL)
    assert (before - logits).abs().max() > 1e-3  # training moved the weights
