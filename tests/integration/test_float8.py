"""Float8 and MXFP8 training through torchao, for real (torchao's float8 matmul has a CPU kernel;
MXFP8 runs emulated)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from torch import nn

from tests.conftest import TINY_RUN, read_metrics
from tests.distributed.dcp_checks import exp_avgs, rel_errors, step_dir
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


# Per-parameter step-1 gradients (Adam's first moment, read from the checkpoints) of a float8
# run against fp32, both from the same trained weights. Measured (tiny, 4 steps): every
# parameter 1.6e-2 … 1.1e-1 relative, median 4e-2 … 7e-2, for every recipe — float8's rounding.
# A run that silently stays in fp32 sits at ~1e-6; a halved or dropped gradient at ≥ 0.5.
FLOAT8_GRAD_FLOOR = 1e-2  # on the median: it really rounds
FLOAT8_GRAD_CEILING = 0.25  # on the worst parameter: it still tracks fp32


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
def test_float8_converts_linears_and_tracks_fp32(
    tmp_path: Path, args: list[str], trained_weights
) -> None:
    start = [
        f"--checkpoint.initial_load_path={trained_weights('tiny')}",
        "--checkpoint.enable",
        "--checkpoint.interval=1",
    ]
    fp32 = train(tmp_path / "fp32", *start).dump_folder
    trainer = train(tmp_path / "float8", *start, "--float8.enable", *args)
    converted = converted_linears(trainer.model_parts[0])
    # Every projection of both blocks (4 attention + 3 FFN), never the output layer.
    assert len(converted) == 2 * 7 and "output" not in converted
    # Measured: ≤ 6e-3 from fp32 over 4 steps.
    for got, want in zip(read_metrics(trainer.dump_folder), read_metrics(fp32), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-2)
    errors = rel_errors(exp_avgs(step_dir(trainer.dump_folder, 1)), exp_avgs(step_dir(fp32, 1)))
    worst = max(errors, key=errors.__getitem__)
    assert errors[worst] <= FLOAT8_GRAD_CEILING, f"{worst}: {errors[worst]:.2e}"
    assert statistics.median(errors.values()) >= FLOAT8_GRAD_FLOOR


def test_mxfp8_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    # Checkpoints hold plain weights, loaded back into torchao's MXFP8 weight wrappers.
    args = [*MXFP8, "--checkpoint.enable", "--lr_scheduler.total_steps=4"]
    uninterrupted = read_metrics(train(tmp_path / "full", *args).dump_folder)
    train(tmp_path / "resumed", *args, "--training.steps=2")
    resumed = read_metrics(train(tmp_path / "resumed", *args).dump_folder)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]
