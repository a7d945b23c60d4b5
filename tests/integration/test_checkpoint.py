"""Checkpoint and resume: a run stopped half-way continues exactly as if never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, read_metrics, run_train

CHECKPOINTED = [
    *TINY_RUN,
    "--training.steps=6",
    "--lr_scheduler.warmup_steps=2",
    "--checkpoint.enable",
    "--checkpoint.interval=3",
]


# Two pipeline stages per rank: the checkpoint holds both under the full model's names.
_PP_INTERLEAVED = [
    "--parallelism.pp=2",
    "--parallelism.dp_shard=1",
    "--parallelism.pp_schedule=Interleaved1F1B",
    "--model.flavor=tiny_pp",
    "--training.local_batch_size=4",
]
LAYOUTS = {"single": (1, []), "fsdp2": (2, ["--parallelism.dp_shard=2"])}
LAYOUTS["pp2_interleaved"] = (2, _PP_INTERLEAVED)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_is_bitwise_identical(tmp_path: Path, name: str) -> None:
    nproc, layout = LAYOUTS[name]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, *CHECKPOINTED, *layout, nproc=nproc)
    # Stop after 3 of 6 steps (same LR schedule), then start again in the same folder.
    run_train(
        resumed,
        *CHECKPOINTED,
        *layout,
        "--training.steps=3",
        "--lr_scheduler.total_steps=6",
        nproc=nproc,
    )
    assert (resumed / "checkpoint" / "step-3" / ".metadata").is_file()
    result = run_train(resumed, *CHECKPOINTED, *layout, nproc=nproc)
    assert "resumed from" in result.stdout
    want = read_metrics(straight)
    got = read_metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want, strict=True):
        assert (g["loss"], g["grad_norm"], g["lr"]) == (w["loss"], w["grad_norm"], w["lr"])
    assert sorted(p.name for p in (resumed / "checkpoint").iterdir()) == ["step-3", "step-6"]
