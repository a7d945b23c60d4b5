"""ParallelDims arithmetic for many world sizes, without launching a process."""

from __future__ import annotations

import pytest

from tetrad.config import ConfigError
from tetrad.distributed.context_parallel import chunk_order
from tetrad.distributed.parallel_dims import ParallelDims


def dims(world_size: int, **degrees: int) -> ParallelDims:
    base = {"dp_replicate": 1, "dp_shard": -1, "cp": 1, "tp": 1, "pp": 1}
    return ParallelDims(**{**base, **degrees}, world_size=world_size)


@pytest.mark.parametrize(
    ("world_size", "degrees", "dp_shard", "dp", "fsdp", "loss_degree"),
    [
        (1, {}, 1, 1, False, 1),
        (8, {}, 8, 8, True, 8),
        (8, {"tp": 2}, 4, 4, True, 4),
        (8, {"dp_replicate": 2, "tp": 2}, 2, 4, True, 4),
        (8, {"dp_replicate": 8, "dp_shard": 1}, 1, 8, False, 8),
        (16, {"pp": 2, "tp": 2, "cp": 2}, 2, 2, True, 4),
        (512, {"pp": 4, "tp": 8, "dp_replicate": 2}, 8, 16, True, 16),
        (4, {"tp": 4}, 1, 1, False, 1),
        (4, {"cp": 4}, 1, 1, True, 4),
    ],
)
def test_degrees(world_size, degrees, dp_shard, dp, fsdp, loss_degree) -> None:
    d = dims(world_size, **degrees)
    assert d.dp_shard == dp_shard
    assert d.dp == dp
    assert d.fsdp_enabled is fsdp
    assert d.loss_parallel_degree == loss_degree
    assert d.dp_replicate * d.dp_shard * d.cp * d.tp * d.pp == world_size


def test_product_mismatch_shows_the_arithmetic() -> None:
    with pytest.raises(ConfigError) as info:
        dims(2, dp_shard=2, tp=2)
    assert str(info.value).startswith(
        "parallelism degrees pp 1 × dp_replicate 1 × dp_shard 2 × cp 1 × tp 2 = 4 ≠ world size 2"
    )


def test_fill_that_does_not_divide() -> None:
    with pytest.raises(ConfigError, match="does not divide world size 6"):
        dims(6, tp=4)


def test_context_parallel_chunks_balance_causal_work() -> None:
    # Rank r holds chunks r and 2·cp−1−r: under a causal mask chunk c attends to c+1 chunks,
    # so every rank attends to the same number of (chunk, key-chunk) pairs.
    for cp in (1, 2, 4, 8):
        order = chunk_order(cp)
        assert sorted(order) == list(range(2 * cp))
        work = [order[2 * r] + order[2 * r + 1] + 2 for r in range(cp)]
        assert work == [2 * cp + 1] * cp
