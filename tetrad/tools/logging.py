"""Rank-aware logging: rank 0 speaks, the others only warn, unless every rank is asked for."""

from __future__ import annotations

import logging
import sys


def init_logging(rank: int, *, all_ranks: bool = False) -> None:
    level = logging.INFO if rank == 0 or all_ranks else logging.WARNING
    prefix = f"[rank{rank}] " if all_ranks else ""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
