"""Pipeline parallel with MoE blocks against one process: a DeepSeek-V3-style model (2 dense
blocks, then 2 MoE blocks; balance loss at coef 0.01 and the auxiliary-loss-free bias both on)
under 1F1B (one rank holds only dense blocks) and ZBVZeroBubble (each rank a dense and a MoE
stage; the weight gradients, the routers' balance-loss share included, in a separate pass). Per
step, the loss and gradient norm match the single-process run's, and so do the
whole model's expert loads and balance loss that metrics.jsonl reports, though each stage sees
only its own layers; the routing biases after the last step are bitwise the reference's (each
stage got its own layers' loads). Measured: loss ≤ 2.1e-7, grad norm ≤ 7.5e-8, aux_loss ≤ 1.9e-7
relative; dropping the balance loss's gradient moves the grad norm by up to 2.9e-4 relative
over these 4 steps (one process), far outside RTOL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import TINY_RUN, read_metrics, run_train

pytestmark = pytest.mark.slow

RTOL = 1e-5  # fp32: only the summation order differs (gradients, the stages' balance losses)
ARGS = [
    *TINY_RUN,
    "--model.name=deepseek_moe",
    "--model.flavor=tiny_pp",
    "--training.local_batch_size=4",  # ZBVZeroBubble: one micro-batch per stage, 4 stages
    "--checkpoint.enable",
    "--checkpoint.interval=4",
]
SCHEDULES = ["1F1B", "ZBVZeroBubble"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-process run and a pp 2 run per schedule, from the same initialisation."""
    folders = {"reference": tmp_path_factory.mktemp("reference")}
    run_train(folders["reference"], *ARGS)
    for schedule in SCHEDULES:
        folders[schedule] = tmp_path_factory.mktemp(schedule)
        layout = ["--parallelism.pp=2", "--parallelism.dp_shard=1"]
        run_train(folders[schedule], *ARGS, *layout, f"--parallelism.pp_schedule={schedule}",
                  nproc=2)  # fmt: skip
    return folders


def expert_biases(folder: Path, scratch: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(folder / "checkpoint" / "step-4", scratch)
    model = torch.load(scratch, weights_only=True)["model"]
    return {k: v for k, v in model.items() if k.endswith("expert_bias")}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_with_moe_blocks_matches_one_process(
    schedule: str, runs: dict[str, Path], tmp_path: Path
) -> None:
    got, want = read_metrics(runs[schedule]), read_metrics(runs["reference"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for g, w in zip(got, want, strict=True):
        step = g["step"]
        for key in ("loss", "grad_norm", "aux_loss"):
            assert g[key] == pytest.approx(w[key], rel=RTOL), f"step {step} {key}"
        # Tokens per expert are whole numbers: the same routing gives exactly the same loads.
        for key in ("expert_load_min", "expert_load_max", "expert_load_mean"):
            assert g[key] == w[key], f"step {step} {key}"
        assert w["expert_load_mean"] == 4 * 64 * 2 / 8  # tokens × top_k / experts
    biases = expert_biases(runs[schedule], tmp_path / "got.pt")
    reference = expert_biases(runs["reference"], tmp_path / "want.pt")
    assert (
        sorted(biases)
        == sorted(reference)
        == [f"layers.{i}.feed_forward.router.expert_bias" for i in (2, 3)]
    )
    for key, bias in reference.items():
        assert bias.abs().sum() > 0, key  # it moved
        assert torch.equal(biases[key], bias), key
