"""Rank-aware logging: rank 0 speaks on the console, the others only warn there unless every rank
is asked for; every rank also writes all its records as JSON lines to its own file, from the
moment the run has started (``open_log_files``): a run refused at start-up writes nothing."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from pathlib import Path


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record, so per-rank logs can be merged and filtered by tools."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": record.created,
            "rank": self.rank,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def init_logging(rank: int, *, all_ranks: bool = False, log_dir: Path | None = None) -> None:
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    prefix = f"[rank{rank}] " if all_ranks else ""
    console.setFormatter(
        logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    handlers: list[logging.Handler] = [console]
    if log_dir is not None:
        handlers.append(_LogFileOnceStarted(log_dir / f"rank{rank}.jsonl", rank))
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)


class _LogFileOnceStarted(logging.handlers.MemoryHandler):
    """Keeps the records until ``open_log_files``, then writes them, and every later one at
    once, to the rank's file."""

    def __init__(self, path: Path, rank: int) -> None:
        super().__init__(capacity=sys.maxsize, flushLevel=logging.CRITICAL + 1)
        self.path, self.rank = path, rank

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        target = logging.FileHandler(self.path)
        target.setFormatter(JsonLinesFormatter(self.rank))
        self.capacity = 0  # from now on every record is written as it comes
        self.setTarget(target)
        self.flush()

    def close(self) -> None:
        target = self.target
        super().close()
        if target is not None:
            target.close()


def open_log_files() -> None:
    """The run has started: the per-rank log files are created, with the records so far."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _LogFileOnceStarted):
            handler.open()


def flush_logs() -> None:
    """Write out every log handler's buffer: before a process ends without unwinding
    (SIGKILL, ``os._exit``), which would lose it."""
    for handler in logging.getLogger().handlers:
        handler.flush()
