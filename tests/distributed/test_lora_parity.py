"""LoRA under FSDP 2 with activation checkpointing, and under pipeline parallel 2, against the
single-process run of the same global batch, from pre-trained weights (``trained_weights``, a
base-only checkpoint): the same losses and gradient norms, the same adapter gradients and
updates, the frozen base untouched in both, and every tensor (frozen ones too) sharded as the
layout implies (FSDP: in two; PP: written by its stage only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.dcp_checks import (
    Layout,
    check_sharding,
    exp_avgs,
    model_weights,
    rel_errors,
    step_dir,
)
from tests.distributed.test_parity import (
    GRAD_RTOL,
    RTOL,
    UPDATE_RTOL,
    Start,
    assert_metrics_parity,
    reference,
    train,
)
from tetrad.models.lora import is_adapter

pytestmark = pytest.mark.slow

LORA = ["--lora.rank=4", "--lora.targets=q,k,v,o,gate,up,down"]


CASES = {
    "fsdp2_ac_full": (2, ["--parallelism.dp_shard=2", "--activation_checkpoint.mode=full"]),
    "pp2": (1, ["--parallelism.pp=2", "--parallelism.dp_shard=1"]),
}


@pytest.mark.parametrize("case", CASES)
def test_lora_layout_matches_one_process(
    case: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, trained_weights: Start
) -> None:
    dp, layout = CASES[case]
    got = train(tmp_path, trained_weights, *LORA, *layout, nproc=2)
    want = reference(tmp_path_factory, trained_weights, dp, 1, *LORA)
    assert_metrics_parity(got, want, rtol=RTOL)

    initial = model_weights(trained_weights("tiny"))
    first, last = model_weights(step_dir(got, 1)), model_weights(step_dir(got, 4))
    want_first, want_last = model_weights(step_dir(want, 1)), model_weights(step_dir(want, 4))
    assert all(torch.equal(last[k], v) and torch.equal(want_last[k], v) for k, v in initial.items())
    adapters = sorted(k for k in last if is_adapter(k))
    assert len(adapters) == 2 * 7 * 2 and set(last) == set(initial) | set(adapters)
    # B starts at zero, so A's step-1 gradient is exactly zero: compare B's there, both after.
    grads = exp_avgs(step_dir(got, 1))
    want_grads = exp_avgs(step_dir(want, 1))
    assert grads.keys() == set(adapters)
    b_grads = rel_errors(
        {k: v for k, v in grads.items() if k.endswith("lora_b")},
        {k: v for k, v in want_grads.items() if k.endswith("lora_b")},
    )
    assert max(b_grads.values()) <= GRAD_RTOL, b_grads
    updates = rel_errors(
        {k: last[k] - first[k] for k in adapters},
        {k: want_last[k] - want_first[k] for k in adapters},
    )
    assert max(updates.values()) <= UPDATE_RTOL, updates
    # Every weight (frozen ones too) sharded by the layout, moments for the adapters only.
    n_layers = 2
    checked = check_sharding(step_dir(got, 1), Layout.from_args(layout), n_layers)
    assert checked == len(last) + 2 * len(adapters)
    worst_g, worst_u = max(b_grads, key=b_grads.__getitem__), max(updates, key=updates.__getitem__)
    print(
        f"worst: grad {b_grads[worst_g]:.2e} ({worst_g}), update {updates[worst_u]:.2e} ({worst_u})"
    )
