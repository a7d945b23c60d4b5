"""--debug.fault's options: refused before anything runs when they cannot hit a step or a rank."""

from __future__ import annotations

import pytest

from tetrad.config import ConfigError, load_config, validate_config
from tetrad.train import check_launch


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug.fault=kill", "--debug.fault_at_step=0"],
        ["--debug.fault=stall", "--debug.fault_rank=-1"],
    ],
)
def test_fault_step_and_rank_are_checked(argv: list[str]) -> None:
    with pytest.raises(
        ConfigError, match=r"--debug.fault_at_step must be >= 1 and --debug.fault_rank >= 0"
    ):
        validate_config(load_config(argv))


def test_fault_rank_beyond_the_world_is_refused_at_launch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = load_config(["--debug.fault=kill", "--debug.fault_rank=2", "--parallelism.dp_shard=2"])
    with pytest.raises(SystemExit) as info:
        check_launch(config, 2)
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "tetrad: error: --debug.fault_rank 2 is not a rank of this run (world size 2): pick one "
        "within 0..1\n"
    )
