"""`tetrad train --model.name qwen3_moe` on one process: the loss falls, metrics.jsonl holds the
expert loads and the balance loss, the console line stays one line, the routing biases (a
buffer, moved after each step) resume from a DCP checkpoint exactly, and gradient accumulation
changes neither the balance loss nor its gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import TINY_RUN, read_metrics, run_train
from tetrad.config import load_config
from tetrad.trainer import Trainer

STEPS, HALF = 8, 4
ARGS = [
    *TINY_RUN,
    "--model.name=qwen3_moe",
    f"--training.steps={STEPS}",
    "--optimizer.lr=1e-2",
    "--checkpoint.enable",
    f"--checkpoint.interval={HALF}",
]
TOKENS, TOP_K, EXPERTS = 2 * 64, 2, 8  # per step (TINY_RUN), qwen3_moe tiny's routing


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """An uninterrupted run, and one stopped after step 4 and resumed; the straight run's
    console output."""
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    out = run_train(straight, *ARGS).stdout
    run_train(resumed, *ARGS, f"--training.steps={HALF}", f"--lr_scheduler.total_steps={STEPS}")
    run_train(resumed, *ARGS)
    return straight, resumed, out


def expert_biases(step_folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(step_folder, scratch)
    model = torch.load(scratch, weights_only=True)["model"]
    return {k: v for k, v in model.items() if k.endswith("expert_bias")}


def test_loss_falls_and_metrics_hold_expert_loads(runs: tuple[Path, Path, str]) -> None:
    straight, _, out = runs
    records = read_metrics(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses  # 9.61 → 8.56 when written
    for r in records:
        # Mean tokens per expert over layers and experts: tokens × top_k / experts, exactly.
        assert r["expert_load_mean"] == TOKENS * TOP_K / EXPERTS
        assert 0 <= r["expert_load_min"] <= r["expert_load_mean"] <= r["expert_load_max"]
        # coef 0.001 × f·P per sequence, which is ≥ ~1 (1 when balanced) and ≤ experts / k.
        assert 0.0009 < r["aux_loss"] < 0.001 * EXPERTS / TOP_K
    step_lines = [line for line in out.splitlines() if " step " in line and "loss" in line]
    assert len(step_lines) == STEPS
    last = records[-1]
    want = (
        f"experts {last['expert_load_min']:.0f}/{last['expert_load_mean']:.0f}/"
        f"{last['expert_load_max']:.0f}  aux {last['aux_loss']:.2e}"
    )
    assert step_lines[-1].endswith(want)


def test_routing_biases_resume_exactly(runs: tuple[Path, Path, str], tmp_path: Path) -> None:
    straight, resumed, _ = runs
    want, got = read_metrics(straight), read_metrics(resumed)
    for g, w in zip(got, want, strict=True):
        assert (g["loss"], g["grad_norm"], g["expert_load_max"]) == (
            w["loss"], w["grad_norm"], w["expert_load_max"],
        )  # fmt: skip
    halfway = expert_biases(resumed / "checkpoint" / f"step-{HALF}", tmp_path / "h.pt")
    assert len(halfway) == 2 and all(bias.abs().sum() > 0 for bias in halfway.values())
    final = expert_biases(straight / "checkpoint" / f"step-{STEPS}", tmp_path / "s.pt")
    again = expert_biases(resumed / "checkpoint" / f"step-{STEPS}", tmp_path / "r.pt")
    assert final.keys() == again.keys() == halfway.keys()
    for key, bias in final.items():
        assert torch.equal(bias, again[key]), key
        assert not torch.equal(bias, halfway[key]), key  # it kept moving after the resume


def test_gradient_accumulation_keeps_the_balance_loss(tmp_path: Path) -> None:
    """2 micro-batches of one sequence each give the loss, gradients (the balance loss's
    included), loads and balance loss of the 2-sequence batch: the loss is a mean per
    sequence whatever the micro-batching."""
    args = [*TINY_RUN, "--model.name=qwen3_moe", f"--job.dump_folder={tmp_path}"]
    trainer = Trainer(load_config([*args, "--training.max_norm=0"]))
    try:
        (model,) = trainer.model_parts
        batch = next(iter(trainer.dataloader))  # [2, T]
        results = []
        for micro_batches in ([batch], [batch.map(lambda x: x[:1]), batch.map(lambda x: x[1:])]):
            model.zero_grad(set_to_none=True)
            loss = trainer.forward_backward(micro_batches)
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
            results.append((loss, grads, trainer.expert_balance.end_step(update=False)))
        (full_loss, full_grads, full_figures), (loss, grads, figures) = results
        torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=0)
        for name, grad in full_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert figures.keys() == full_figures.keys() == {
            "expert_load_min", "expert_load_max", "expert_load_mean", "aux_loss"
        }  # fmt: skip
        for key, value in full_figures.items():
            assert abs(figures[key] - value) <= 1e-6 * abs(value), key
        assert full_grads["layers.0.feed_forward.router.gate.weight"].abs().sum() > 0
    finally:
        trainer.close()
