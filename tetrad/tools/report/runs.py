"""A run folder as the report reads it: its metrics.jsonl records and its config.toml.

Training writes one JSON object per line to ``metrics.jsonl``: a training record per logged step
(``step``, ``loss``, ``grad_norm``, ``lr``, ``tokens_per_sec``, ``mfu``, ``memory_gib``, ...;
a non-finite figure as null) and a validation record per evaluation (``step``, ``val_loss``,
``val_perplexity``). A run killed while writing leaves its last line unfinished (no newline):
that line is skipped and said so; any other line that is not such a record is bad input.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tetrad.errors import UserError


class ReportError(UserError):
    """A run folder (or an output path) the report cannot use as given."""


@dataclass(frozen=True, kw_only=True)
class Run:
    folder: Path
    label: str
    """The folder's name, with as many parent folders as it takes to tell the runs apart."""
    records: list[dict[str, Any]]
    """Every record of metrics.jsonl, in file order (validation ones hold ``val_loss``)."""
    config_text: str | None
    """config.toml as written, or None where the folder has none."""
    config: dict[str, Any]
    """config.toml flattened to dotted keys (``training.steps``); empty without one."""
    notes: list[str]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and finite values of ``key`` over the records that hold it."""
        pairs = [
            (int(r["step"]), float(r[key]))
            for r in self.records
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])
        ]
        return [s for s, _ in pairs], [v for _, v in pairs]


def _record(line: str) -> dict[str, Any]:
    """The record on ``line``; a ValueError saying why it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err.msg}") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"its step is {step!r}")
    return record


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        raise ReportError(
            f"{path} cannot be read ({err.strerror}); check its permissions"
        ) from None


def _records(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    text = _read(path)
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(_record(line))
        except ValueError as err:
            if number == len(lines) and not text.endswith("\n"):
                notes.append(f"skipped the unfinished last line ({number}) a killed run left")
                break
            raise ReportError(
                f"{path} line {number} is not a metrics record ({err}); remove or repair it"
            ) from None
    if not records:
        raise ReportError(f"{path} holds no records; give a run that has logged a step")
    return records


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_run(folder: Path, label: str) -> Run:
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder; give the --job.dump_folder of a run")
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(
            f"{folder} holds no metrics.jsonl; give the --job.dump_folder of a run that has "
            "logged a step"
        )
    notes: list[str] = []
    records = _records(metrics, notes)
    config_path = folder / "config.toml"
    config_text = _read(config_path) if config_path.is_file() else None
    try:
        config = _flatten(tomllib.loads(config_text)) if config_text is not None else {}
    except tomllib.TOMLDecodeError as err:
        raise ReportError(f"{config_path} is not TOML ({err}); restore or remove it") from None
    if config_text is None:
        notes.append("no config.toml in this folder")
    return Run(
        folder=folder,
        label=label,
        records=records,
        config_text=config_text,
        config=config,
        notes=notes,
    )


def labels(folders: Sequence[Path]) -> list[str]:
    """Each folder's name; where names repeat, as many parent folders as tell them apart; the
    same folder given twice gets ``#2``, ``#3``."""
    parts = [folder.resolve().parts for folder in folders]
    found = []
    for own in parts:
        depth = 1
        while depth < len(own) and any(
            other[-depth:] == own[-depth:] and other != own for other in parts
        ):
            depth += 1
        found.append("/".join(own[-depth:]))
    for i, label in enumerate(found):
        if (repeat := found[:i].count(label)) > 0:
            found[i] = f"{label} #{repeat + 1}"
    return found


def read_runs(folders: Sequence[Path]) -> list[Run]:
    return [read_run(folder, label) for folder, label in zip(folders, labels(folders), strict=True)]
