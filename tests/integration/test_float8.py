"""Float8 and MXFP8 training through torchao, for real (torchao's float8 matmul has a CPU kernel;
MXFP8 runs emulated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from tests.conftest import TINY_RUN, read_metrics
from tetrad.config import load_config
from tetrad.trainer import Trainer

float8_linear = pytest.importorskip("torchao.float8.float8_linear")
mx_training = pytest.importorskip("torchao.prototype.moe_training.tensor")

MXFP8 = ["--float8.enable", "--float8.recipe=mxfp8", "--float8.emulate"]


def train(folder: Path, *args: str) -> Trainer:
    trainer = Trainer(load_config([*TINY_RUN, f"--job.dump_folder={folder}", *args]))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def converted_linears(model: nn.Module) -> set[str]:
    """Float8Linear modules, and linears whose weight is torchao's MXFP8 training tensor."""
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, float8_linear.Float8Linear)
        or isinstance(getattr(module, "weight", None), mx_training.MXFP8TrainingWeightWrapperTensor)
    }


@pytest.mark.parametrize(
    "args",
    [
        ["--float8.recipe=tensorwise"],
        ["--float8.recipe=tensorwise", "--float8.emulate"],
        ["--float8.recipe=rowwise"],
        MXFP8,
    ],
    ids=["tensorwise", "tensorwise_emulated", "rowwise", "mxfp8_emulated"],
)
def test_float8_converts_linears_and_tracks_fp32_loss(tmp_path: Path, args: list[str]) -> None:
    reference = read_metrics(train(tmp_path / "fp32").dump_folder)
    trainer = train(tmp_path / "float8", "--float8.enable", *args)
    converted = converted_linears(trainer.model_parts[0])
    # Every projection of both blocks (4 attention + 3 FFN), never the output layer.
    assert len(converted) == 2 * 7 and "output" not in converted
    # Measured: ≤ 5e-3 from fp32 over 4 steps, against a fall of 0.27 in the first step.
    for got, want in zip(read_metrics(trainer.dump_folder), reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-2)
        assert got["loss"] != want["loss"]  # it really computed in low precision


def test_mxfp8_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    # Checkpoints hold plain weights, loaded back into torchao's MXFP8 weight wrappers.
    args = [*MXFP8, "--checkpoint.enable", "--lr_scheduler.total_steps=4"]
    uninterrupted = read_metrics(train(tmp_path / "full", *args).dump_folder)
    train(tmp_path / "resumed", *args, "--training.steps=2")
    resumed = read_metrics(train(tmp_path / "resumed", *args).dump_folder)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]
