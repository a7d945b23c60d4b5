"""Warmup-stable-decay values at the phase boundaries, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from tetrad.components.lr_scheduler import build_lr_scheduler, wsd_factor
from tetrad.config import Config, validate_config
from tetrad.config.job_config import LRSchedulerConfig
from tetrad.errors import ConfigError


def _factors(total: int, **kwargs) -> list[float]:
    return [wsd_factor(s, total_steps=total, **kwargs) for s in range(total)]


def test_warmup_stable_linear_decay_boundaries() -> None:
    # 100 steps, 10 warmup, last 20% decaying linearly to 10% of the peak.
    f = _factors(100, warmup_steps=10, decay_ratio=0.2, decay_type="linear", min_lr_factor=0.1)
    assert f[0] == pytest.approx(0.1)  # first warmup step: 1/10
    assert f[9] == pytest.approx(1.0)  # last warmup step reaches the peak
    assert f[10] == f[79] == 1.0  # stable plateau
    assert f[80] == pytest.approx(0.1 + 0.9 * (1 - 1 / 20))  # first decay step
    assert f[89] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f[99] == pytest.approx(0.1)  # the floor at the last step


@pytest.mark.parametrize(
    ("decay_type", "curve"),
    [
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        ("sqrt", lambda p: 1 - math.sqrt(p)),
    ],
)
def test_decay_shapes_over_all_post_warmup_steps(decay_type, curve) -> None:
    f = _factors(20, warmup_steps=4, decay_ratio=None, decay_type=decay_type, min_lr_factor=0.0)
    assert f[3] == pytest.approx(1.0)
    for step in range(4, 20):
        assert f[step] == pytest.approx(curve((step - 3) / 16))
    assert f[-1] == pytest.approx(0.0, abs=1e-12)


def test_no_warmup_and_scheduler_drives_optimizer() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    config = LRSchedulerConfig(warmup_steps=2, decay_ratio=0.5, decay_type="linear")
    scheduler = build_lr_scheduler(optimizer, config, total_steps=4)
    lrs = learning_rates(scheduler, optimizer, steps=4)
    assert lrs == pytest.approx([1.0, 2.0, 1.0, 0.0])
    # Stateful: a new scheduler loading the state continues at the same point.
    resumed = build_lr_scheduler(torch.optim.SGD([param], lr=2.0), config, total_steps=4)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.last_epoch == 4


@pytest.mark.parametrize(("warmup", "decay_ratio"), [(4, None), (2, 0.0)])
def test_schedule_without_decay_steps(warmup: int, decay_ratio: float | None) -> None:
    """All-warmup or zero-decay schedules: LambdaLR's look at the step after the last one
    must not divide by the zero decay length."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    config = LRSchedulerConfig(warmup_steps=warmup, decay_ratio=decay_ratio)
    scheduler = build_lr_scheduler(optimizer, config, total_steps=4)
    lrs = learning_rates(scheduler, optimizer, steps=4)
    want = [0.25, 0.5, 0.75, 1.0] if warmup == 4 else [0.5, 1.0, 1.0, 1.0]
    assert lrs == pytest.approx(want)


def learning_rates(
    scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, *, steps: int
) -> list[float]:
    """The learning rate of each of ``steps`` optimizer steps under ``scheduler``."""
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_default_warmup_is_shortened_to_a_short_run(caplog: pytest.LogCaptureFixture) -> None:
    """`tetrad train --training.steps 5` is valid: the default warmup (10) is cut to the
    schedule's 5 steps (logged), an all-warmup schedule reaching the peak at the last step; a
    warmup the user chose longer than the run stays an error."""
    config = Config()
    config.training.steps = 5
    validate_config(config)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    with caplog.at_level("INFO"):
        scheduler = build_lr_scheduler(optimizer, config.lr_scheduler, total_steps=5)
    assert "the default 10 is longer than the 5-step schedule" in caplog.text
    assert learning_rates(scheduler, optimizer, steps=5) == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    config.lr_scheduler.warmup_steps = 6
    with pytest.raises(ConfigError, match=r"warmup_steps 6 must be within 0\.\.5"):
        validate_config(config)
