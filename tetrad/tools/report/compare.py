"""Each run against the first, step by step: the parity check after a change of layout (the
same seed and data under FSDP 2 instead of 1 process should give the same losses, within float
reordering)."""

from __future__ import annotations

from dataclasses import dataclass

from tetrad.tools.report.runs import Run

COMPARED = ("loss", "val_loss")
"""The figures the report compares between runs."""


@dataclass(frozen=True, kw_only=True)
class Difference:
    """``run``'s ``key`` minus the first run's, at the steps where both logged a finite value."""

    run: Run
    key: str
    steps: list[int]
    values: list[float]

    def largest(self) -> tuple[float, int] | None:
        """The largest |difference| and the first step it occurs at; None without shared steps."""
        if not self.steps:
            return None
        size, step = max((abs(v), -s) for s, v in zip(self.steps, self.values, strict=True))
        return size, -step


def difference(first: Run, run: Run, key: str) -> Difference:
    reference = dict(zip(*first.series(key), strict=True))
    shared = [
        (s, v - reference[s]) for s, v in zip(*run.series(key), strict=True) if s in reference
    ]
    return Difference(run=run, key=key, steps=[s for s, _ in shared], values=[v for _, v in shared])


def differences(runs: list[Run], key: str) -> list[Difference]:
    """Every run after the first against the first (none for a single run)."""
    return [difference(runs[0], run, key) for run in runs[1:]]
