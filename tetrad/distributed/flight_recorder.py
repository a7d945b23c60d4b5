"""The c10d flight recorder: every rank keeps a ring of its last collectives (name, sequence
number, group, sizes, state), dumped per rank to ``<dump_folder>/flight_recorder/`` when a
collective times out, so that "which rank hung, and where" has an answer on disk.

The recorder must be sized before the process group is created (``TORCH_FR_BUFFER_SIZE``); it
works on gloo and nccl. tetrad writes each rank's record as JSON (``rank<R>.json``) from its
hang path (``tetrad.distributed.hang``); on CUDA, nccl's own watchdog also dumps on a timeout
(pickles ``rank<R>``, read by ``python -m torch.distributed.flight_recorder.fr_trace``), since
it may end the process before Python sees the error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

# The recorder's JSON dump: public in torch's C++ API, absent from its Python stubs.
from torch._C._distributed_c10d import _dump_fr_trace_json  # type: ignore[attr-defined]

logger = logging.getLogger(__name__)

FOLDER = "flight_recorder"

_folder: Path | None = None


def enable(entries: int, dump_folder: Path, *, cuda: bool) -> None:
    """Record this rank's last ``entries`` collectives (0: none), for dumps under
    ``dump_folder``. Call before the process group exists; a value already in the environment
    (set by the user) wins."""
    global _folder
    if entries <= 0:
        return
    _folder = dump_folder / FOLDER
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(entries))
    if cuda:
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(_folder / "rank"))
        _folder.mkdir(parents=True, exist_ok=True)  # nccl's watchdog writes into it


def dump(rank: int) -> Path | None:
    """Write this rank's record (``None`` when the recorder is off); never raises, since it
    runs on the way out of a failed run."""
    if _folder is None:
        return None
    path = _folder / f"rank{rank}.json"
    try:
        _folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_dump_fr_trace_json())
    except Exception as e:  # a full disk must not hide the timeout itself
        logger.warning("flight recorder: could not write %s: %s", path, e)
        return None
    logger.warning("flight recorder: this rank's last collectives in %s", path)
    return path


def wait_for_dumps(world_size: int, seconds: float) -> Path | None:
    """The folder once every rank's record is in it, or ``seconds`` have passed (the other
    ranks dump when they see the abort); None when the recorder is off."""
    if _folder is None:
        return None
    deadline = time.monotonic() + seconds
    while len(list(_folder.glob("rank*.json"))) < world_size and time.monotonic() < deadline:
        time.sleep(0.1)
    return _folder


def laggards(folder: Path, shown: int = 3) -> str | None:
    """Which ranks are behind, from the records in ``folder``: per process group, the ranks
    whose last enqueued collective is older than the others' (a rank that never arrived), or
    None when every rank reached the same collective or there is nothing to compare. At most
    ``shown`` ranks are named: a message stays one line at any scale."""
    records = {}
    for path in sorted(folder.glob("rank*.json")):
        try:
            records[int(path.stem.removeprefix("rank"))] = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
    behind: dict[int, str] = {}
    for group in {g for record in records.values() for g in record.get("pg_status", {})}:
        last = {
            rank: int(record["pg_status"][group]["last_enqueued_collective"])
            for rank, record in records.items()
            if group in record.get("pg_status", {})
        }
        if len(last) < 2 or len(set(last.values())) == 1:
            continue
        newest = max(last.values())
        for rank, seq in last.items():
            if seq < newest:
                name = _collective_name(records[max(last, key=last.__getitem__)], group, newest)
                behind.setdefault(
                    rank,
                    f"rank {rank} (its last collective in group {group} was #{seq}; "
                    f"others waited in #{newest}, {name})",
                )
    if not behind:
        return None
    ranks = sorted(behind)
    more = f"; and {len(ranks) - shown} more" if len(ranks) > shown else ""
    return "behind: " + "; ".join(behind[rank] for rank in ranks[:shown]) + more


def _collective_name(record: dict[str, Any], group: str, seq: int) -> str:
    for entry in record.get("entries", []):
        if str(entry.get("process_group", [None])[0]) == group and (
            entry.get("collective_seq_id") == seq
        ):
            return str(entry.get("profiling_name", "a collective"))
    return "a collective"
