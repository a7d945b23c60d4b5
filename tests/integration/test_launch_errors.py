"""`tetrad train --nproc N` with a layout the ranks cannot run: exit code 2 and one line, the
message, instead of a torchrun failure report per rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, run_train


def _one_line(result) -> str:
    assert result.returncode == 2
    (line,) = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    assert line.startswith("tetrad: error: ")
    return line


@pytest.mark.slow
def test_bad_pipeline_split_is_one_line_error(tmp_path: Path) -> None:
    # Found by the ranks, which know the model's blocks: rank 0 prints, the launcher exits 2.
    args = ["--parallelism.pp=2", "--parallelism.dp_shard=1"]
    args += ["--parallelism.pp_schedule=Interleaved1F1B"]  # 4 stages of tiny's 2 blocks
    result = run_train(tmp_path, *TINY_RUN, *args, nproc=2, expect_ok=False)
    assert (
        "2 layers do not split evenly into 4 pipeline stages (Interleaved1F1B: 2 per rank × pp 2)"
        in _one_line(result)
    )


def test_bad_mesh_is_one_line_error(tmp_path: Path) -> None:
    # Found before torchrun starts: nothing is launched, nothing written.
    args = ["--parallelism.dp_shard=2", "--parallelism.tp=2"]
    result = run_train(tmp_path, *TINY_RUN, *args, nproc=2, expect_ok=False)
    assert (
        "parallelism degrees pp 1 × dp_replicate 1 × dp_shard 2 × cp 1 × tp 2 = 4 ≠ world size 2"
        in _one_line(result)
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
