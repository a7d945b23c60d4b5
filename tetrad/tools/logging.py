"""Rank-aware logging: rank 0 speaks on the console, the others only warn there unless every rank
is asked for; every rank also writes all its records as JSON lines to its own file."""

from __future__ import annotations

import json
import logging
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
        log_dir.mkdir(parents=True, exist_ok=True)
        per_rank = logging.FileHandler(log_dir / f"rank{rank}.jsonl")
        per_rank.setFormatter(JsonLinesFormatter(rank))
        handlers.append(per_rank)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)
