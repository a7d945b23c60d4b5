"""Local data files that cannot be trained on, named with the record at fault.

``check_start`` runs at start-up, cheaply: every file can be opened, is not empty, and its first
record reads. ``first_bad_record`` runs only once reading has failed (``datasets`` names neither
the file nor the record): it scans the files in order, as the builders would read them, and
says where the first unreadable or unusable record is.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from tetrad.errors import DataError

RecordCheck = Callable[[dict[str, Any]], str | None]
"""A record's problem for the data format (a missing or null text field), or None."""

_HEAD_BYTES = 1 << 16


def _records(path: Path, builder: str, limit: int | None) -> Iterator[tuple[str, Any]]:
    """(where, record or an exception) for the file's first ``limit`` records (all: None)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
            rows = (
                row for batch in table.iter_batches(batch_size=256) for row in batch.to_pylist()
            )
            for i, row in enumerate(islice(rows, limit)):
                yield f"row {i + 1}", row
        except Exception as err:  # pyarrow raises its own kinds; all mean "cannot read"
            yield "its parquet data", err
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    with path.open("rb") as f:
        for number, raw in enumerate(islice(f, limit), start=1):
            try:
                line = decoder.decode(raw)
            except UnicodeDecodeError as err:
                yield f"line {number}", ValueError(f"not UTF-8 text (byte {raw[err.start]:#04x})")
                return
            if builder == "text":
                yield f"line {number}", {"text": line.rstrip("\r\n")}
            elif line.strip():
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line {number}", ValueError(f"invalid JSON ({err.msg})")
                    return


def _problem(record: Any, check: RecordCheck | None) -> str | None:
    if isinstance(record, Exception):
        return str(record).splitlines()[0]
    if not isinstance(record, dict):
        return f"a JSON record must be an object, got {type(record).__name__}"
    return None if check is None else check(record)


def check_start(files: list[str], builder: str) -> None:
    """Each file opens, is not empty, and its first record reads (`.json` holding one JSON
    document, not JSON lines, is left to the builder)."""
    for file in files:
        path = Path(file)
        try:
            with path.open("rb") as f:
                head = f.read(_HEAD_BYTES)
        except OSError as err:
            raise DataError(f"data file {file}: cannot be read ({err.strerror})") from None
        if not head.strip():
            raise DataError(f"data file {file} is empty; remove it or give another --data.path")
        if path.suffix == ".json" and head.lstrip()[:1] == b"[":
            continue
        for where, record in _records(path, builder, limit=1):
            if problem := _problem(record, None):
                raise DataError(f"data file {file}, {where}: {problem}")


def first_bad_record(files: list[str], builder: str, check: RecordCheck | None) -> str | None:
    """``file, line N: problem`` for the first record of ``files`` that cannot be read or fails
    ``check``; None if every record is fine."""
    for file in files:
        path = Path(file)
        if path.suffix == ".json" and path.read_bytes().lstrip()[:1] == b"[":
            continue  # one JSON document: the builder's error stands
        for where, record in _records(path, builder, limit=None):
            if problem := _problem(record, check):
                return f"data file {file}, {where}: {problem}"
    return None
