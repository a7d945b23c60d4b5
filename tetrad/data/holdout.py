"""The validation split of a source that has none: documents chosen by a hash of their content,
so the same ones are held out under any data-parallel layout, on resume, and in a separate
evaluation, and training never reads them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import datasets

from tetrad.config.job_config import DataConfig, ValidationConfig
from tetrad.errors import ConfigError

_SPLITLESS = frozenset({"default", "stdlib_qa", "local"})
"""Built-in sources that read the same documents whatever --data.split says."""


@dataclass(frozen=True)
class Holdout:
    """One side of the hash split: the held-out ``fraction`` of the documents, or the rest."""

    fraction: float
    held_out: bool

    def keeps(self, row: dict[str, Any]) -> bool:
        encoded = json.dumps(row, sort_keys=True, default=str).encode()
        digest = hashlib.blake2b(encoded, digest_size=8).digest()
        return (int.from_bytes(digest, "big") < self.fraction * 2**64) == self.held_out

    def apply(self, source: datasets.IterableDataset) -> datasets.IterableDataset:
        return source.filter(self.keeps)


def _holds_out(validation: ValidationConfig) -> bool:
    """No validation source named: validation reads a held-out slice of the training source."""
    v = validation
    return v.dataset is None and v.path is None and v.split is None


def validation_data(
    data: DataConfig, validation: ValidationConfig
) -> tuple[DataConfig, Holdout | None]:
    """The validation source's data config, and the held-out side of the training source to read
    when no validation source is named (None: read the named source whole)."""
    v = validation
    if _holds_out(v):
        return data, Holdout(v.holdout_fraction, held_out=True)
    own_source = v.dataset is not None or v.path is not None
    if (
        not own_source
        and data.mix is None
        and (data.path is not None or data.dataset in _SPLITLESS)
    ):
        raise ConfigError(
            f"--validation.split {v.split!r}: the training source "
            f"{data.path or data.dataset!r} has no splits (every split name reads the same "
            "documents); name a validation source with --validation.path or --validation.dataset, "
            "or leave all three unset for a held-out slice"
        )
    named = dataclasses.replace(
        data,
        dataset=v.dataset or data.dataset,
        path=v.path if own_source else data.path,
        mix=None if own_source else data.mix,
        split=v.split or data.split,
    )
    return named, None


def training_holdout(validation: ValidationConfig) -> Holdout | None:
    """The side of the training source training reads: all of it, unless validation holds out
    a slice of it."""
    if not (validation.enable and _holds_out(validation)):
        return None
    return Holdout(validation.holdout_fraction, held_out=False)
