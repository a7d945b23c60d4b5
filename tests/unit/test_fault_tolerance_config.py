"""[fault_tolerance]: what validate_config refuses (one line each), and how the replica groups
split the data between them."""

from __future__ import annotations

import sys

import pytest

from tetrad.config import ConfigError, load_config, validate_config
from tetrad.distributed.fault_tolerance import data_shard

FT = ["--fault_tolerance.enable", "--fault_tolerance.lighthouse=http://localhost:29510"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fault_tolerance.group_count=2", "--fault_tolerance.replica_id=2"], "within 0..1"),
        (["--fault_tolerance.replica_id=-1"], "within 0..0"),
        (["--fault_tolerance.group_count=0"], "group_count must be >= 1"),
        (["--fault_tolerance.min_replica_size=2"], "min_replica_size 2 must be within 1..1"),
        (["--fault_tolerance.timeout_seconds=0"], "timeout_seconds must be positive"),
        (["--parallelism.pp=2"], "does not support pipeline parallel"),
    ],
)
def test_bad_fault_tolerance_options(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config([*FT, *argv]))


def test_lighthouse_address_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    with pytest.raises(ConfigError, match="TORCHFT_LIGHTHOUSE"):
        validate_config(load_config(["--fault_tolerance.enable"]))
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://localhost:29510")
    validate_config(load_config(["--fault_tolerance.enable"]))


def test_groups_read_disjoint_parts_of_the_data() -> None:
    config = load_config([*FT, "--fault_tolerance.group_count=3"]).fault_tolerance
    shards = set()
    for replica_id in range(3):
        config.replica_id = replica_id
        shards |= {data_shard(config, rank, 2) for rank in range(2)}
    assert shards == {(rank, 6) for rank in range(6)}  # every loader rank once, of 3 groups × 2
    config.enable = False
    assert data_shard(config, 1, 2) == (1, 2)


def test_missing_torchft_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchft", None)  # what the import system sees: not there
    with pytest.raises(ConfigError, match=r"pip install 'tetrad\[ft\]'"):
        validate_config(load_config(FT))
