"""Float8 training through torchao, for real (torchao's float8 matmul has a CPU kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, read_metrics
from tetrad.config import load_config
from tetrad.trainer import Trainer

float8_linear = pytest.importorskip("torchao.float8.float8_linear")


def train(folder: Path, *args: str) -> Trainer:
    trainer = Trainer(load_config([*TINY_RUN, f"--job.dump_folder={folder}", *args]))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_converts_linears_and_tracks_fp32_loss(tmp_path: Path, recipe: str) -> None:
    reference = read_metrics(train(tmp_path / "fp32").dump_folder)
    trainer = train(tmp_path / "float8", "--float8.enable", f"--float8.recipe={recipe}")
    converted = {
        name
        for name, module in trainer.model_parts[0].named_modules()
        if isinstance(module, float8_linear.Float8Linear)
    }
    # Every projection of both blocks (4 attention + 3 FFN), never the output layer.
    assert len(converted) == 2 * 7 and "output" not in converted
    for got, want in zip(read_metrics(trainer.dump_folder), reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-2)
        assert got["loss"] != want["loss"]  # it really computed in float8
