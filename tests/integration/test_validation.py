"""Validation: its loss is a plain evaluation of the checkpoint on the held-out batches, the
same under every layout, and it touches no training state."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RUN, read_metrics, run_train
from tests.integration.test_checkpoint import load_model_state, tiny_model
from tetrad.components.loss import cross_entropy_sum
from tetrad.config import ConfigError, load_config, validate_config
from tetrad.config.job_config import DataConfig, ValidationConfig
from tetrad.data import IGNORE_INDEX, TextDataLoader, build_dataloader, build_tokenizer
from tetrad.data.holdout import Holdout, validation_data
from tetrad.data.sources import build_text_source
from tetrad.errors import DataError
from tetrad.trainer import Trainer

VALIDATION = [
    *TINY_RUN,
    "--model.flavor=tiny_pp",
    "--validation.enable",
    "--validation.freq=2",
    "--validation.steps=2",
]
LAYOUTS = {"fsdp2": ["--parallelism.dp_shard=2"], "pp2": ["--parallelism.pp=2"]}
LAYOUT_RTOL = 1e-5
"""The same weights and batches; fp32 sums in another order."""


def _val_losses(folder: Path) -> dict[int, float]:
    return {m["step"]: m["val_loss"] for m in read_metrics(folder) if "val_loss" in m}


@pytest.mark.slow
def test_validation_loss_is_the_checkpoints_loss_under_every_layout(tmp_path: Path) -> None:
    single = tmp_path / "single"
    # Two micro-batches of one sequence: the global batch of the layouts below.
    accumulate = ["--training.local_batch_size=1", "--training.global_batch_size=2"]
    run_train(single, *VALIDATION, *accumulate, "--checkpoint.enable", "--checkpoint.interval=4")
    val = _val_losses(single)
    assert sorted(val) == [2, 4]
    assert read_metrics(single)[-1]["val_perplexity"] == pytest.approx(math.exp(val[4]))

    # A separate evaluation: the step-4 weights read back by DCP into a plain model, on the
    # first 2 batches of the held-out documents, mean token cross-entropy.
    model = tiny_model(seed=0, flavor="tiny_pp")
    model.load_state_dict(load_model_state(single / "checkpoint" / "step-4", flavor="tiny_pp"))
    loader = build_dataloader(
        DataConfig(), tokenizer=build_tokenizer(None), seq_len=64, batch_size=2, dp_rank=0,
        dp_world_size=1, holdout=Holdout(0.01, held_out=True),
    )  # fmt: skip
    batches = iter(loader)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for _ in range(2):
            batch = next(batches)
            total += cross_entropy_sum(model(batch.inputs), batch.labels).item()
            tokens += int((batch.labels != IGNORE_INDEX).sum())
    assert val[4] == pytest.approx(total / tokens, rel=1e-5)

    # The same weights evaluated under other layouts (one step at learning rate 0 from the
    # step-4 checkpoint, evaluated at its last step) on the same global batch: dp 2 ranks of 1
    # sequence each, or the pipeline's 2 micro-batches.
    start = [
        f"--checkpoint.initial_load_path={single / 'checkpoint' / 'step-4'}",
        "--checkpoint.exclude_from_loading=optimizer,lr_scheduler,dataloader,train_state",
        "--optimizer.lr=0",
        "--training.steps=1",
    ]
    for name, layout in LAYOUTS.items():
        local = ["--training.local_batch_size=1"] if name == "fsdp2" else []
        run_train(tmp_path / name, *VALIDATION, *start, *layout, *local, nproc=2)
        got = _val_losses(tmp_path / name)
        assert got.keys() == {1}
        assert got[1] == pytest.approx(val[4], rel=LAYOUT_RTOL), name


def test_held_out_documents_are_never_trained_on() -> None:
    """The two sides of the hash split partition the source: each document on exactly one,
    about the asked fraction held out."""
    source, _ = build_text_source(DataConfig())
    rows = [row for row, _ in zip(source, range(2000), strict=False)]
    held = [Holdout(0.05, held_out=True).keeps(row) for row in rows]
    trained = [Holdout(0.05, held_out=False).keeps(row) for row in rows]
    assert all(h != t for h, t in zip(held, trained, strict=True))
    assert 0.03 < sum(held) / len(rows) < 0.07


def test_validation_touches_no_training_state(tmp_path: Path) -> None:
    """Parameters, gradients, optimizer, dataloader and RNG are as they were after evaluating."""
    config = load_config([*VALIDATION, f"--job.dump_folder={tmp_path}"])
    trainer = Trainer(config)
    try:
        data = iter(trainer.dataloader)
        trainer.train_step([next(data)])
        model = trainer.model_parts[0]
        before = {
            "params": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": repr(trainer.optimizer.state_dict()),
            "data": trainer.dataloader.state_dict(),
            "rng": torch.get_rng_state(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        }
        assert before["grads"], "the training step should leave gradients"
        assert trainer.validator is not None
        record = trainer.validator.evaluate(trainer.validation_loss_sum)
        assert 0 < record["val_loss"] < 20
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == before["grads"].keys()
        assert all(torch.equal(grads[n], g) for n, g in before["grads"].items())
        after = model.state_dict()
        assert all(torch.equal(before["params"][k], after[k]) for k in after)
        assert repr(trainer.optimizer.state_dict()) == before["optimizer"]
        assert trainer.dataloader.state_dict() == before["data"]
        assert torch.equal(torch.get_rng_state(), before["rng"])
        assert model.training
    finally:
        trainer.close()


@pytest.mark.parametrize("schedule", ["ZBVZeroBubble", "DualPipeV"])
def test_v_schedules_refuse_validation_in_one_line(schedule: str) -> None:
    """torch's pipeline eval cannot run them; every other schedule evaluates (1F1B tested above,
    Interleaved1F1B by hand: the one-process val_loss to 1e-6). Refused before any process
    group starts."""
    args = [*VALIDATION, "--parallelism.pp=2", f"--parallelism.pp_schedule={schedule}"]
    with pytest.raises(
        ConfigError, match=f"cannot evaluate under --parallelism.pp_schedule {schedule}"
    ):
        validate_config(load_config(args))


def test_resume_reads_the_same_side_of_the_hold_out() -> None:
    """A loader state saved reading all but the held-out slice does not load into one reading
    the whole source (its position would fall on other documents)."""

    def make(holdout: Holdout | None) -> TextDataLoader:
        return build_dataloader(
            DataConfig(), tokenizer=build_tokenizer(None), seq_len=16, batch_size=1, dp_rank=0,
            dp_world_size=1, holdout=holdout,
        )  # fmt: skip

    loader = make(Holdout(0.01, held_out=False))
    next(iter(loader))
    with pytest.raises(DataError, match=r"all but the held-out 0\.01 of the source but this run"):
        make(None).load_state_dict(loader.state_dict())


def test_a_split_of_a_source_without_splits_is_refused() -> None:
    validation = ValidationConfig(enable=True, split="validation")
    with pytest.raises(ConfigError, match="has no splits"):
        validation_data(DataConfig(), validation)
