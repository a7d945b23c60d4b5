"""A rank that stopped responding: a collective's timeout becomes one line (``RunStopped``, exit
code 3), and every rank of the attempt exits within a few seconds of it.

The rank whose collective times out knows that some peer is gone or stuck, but not that peer's
state: a rank stuck outside any collective (or deferring SIGTERM to finish its step) would
otherwise live on until the launcher's SIGKILL, ``--shutdown-timeout`` (30 s) after its SIGTERM.
So the timed-out rank posts an abort in the job's store (the launcher's, which outlives every
rank; keyed per attempt by ``init_distributed``'s prefix), and every rank watches for it in a
thread that SIGKILLs its process: a thread still runs while the main one sleeps or waits in C++.
Bound: every rank is gone within the timeout + POLL_SECONDS + GRACE_SECONDS + the launcher's
own reaction (measured on CPU: timeout + 3 to 5 s to the launcher's exit).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import torch.distributed as dist

from tetrad.distributed import flight_recorder
from tetrad.errors import EXIT_CODES, RunStopped
from tetrad.tools.logging import flush_logs

logger = logging.getLogger(__name__)

ABORT_KEY = "tetrad/abort"
POLL_SECONDS = 1.0
"""How often each rank looks for an abort: at one tiny store request per rank per period."""
GRACE_SECONDS = 2.0
"""How long a rank that sees an abort lets the posting rank exit first (with its message and
exit code 3, which the launcher reports) before it kills itself, if the launcher has not
already stopped it."""

_store: dist.Store | None = None
_posted = threading.Event()  # this rank posted the abort: it exits through RunStopped instead
_stopped = threading.Event()
_watcher: threading.Thread | None = None


def watch_for_abort(store: dist.Store) -> None:
    """Start this rank's watcher of ``store`` (a daemon thread: it never holds the exit up)."""
    global _store, _watcher
    _store = store
    _stopped.clear()
    _watcher = threading.Thread(
        target=_watch, args=(store,), name="tetrad-abort-watch", daemon=True
    )
    _watcher.start()


def stop_watching() -> None:
    """End the watcher before the process groups and the store go: a thread still inside a
    store call while the interpreter tears them down aborts the process ("terminate called
    without an active exception")."""
    global _watcher
    _stopped.set()
    if _watcher is not None:
        _watcher.join()
        _watcher = None


def _watch(store: dist.Store) -> None:
    while not _stopped.wait(POLL_SECONDS):
        try:
            if not store.check([ABORT_KEY]):
                continue
            poster = store.get(ABORT_KEY).decode()
        except Exception:  # the launcher's store is gone: the job is over
            return
        if _posted.is_set():
            return
        flight_recorder.dump(dist.get_rank())
        logger.warning(
            "stopping in %.0f s: rank %s stopped on a collective timeout", GRACE_SECONDS, poster
        )
        flush_logs()
        time.sleep(GRACE_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)  # no handler may defer it


def is_timeout(error: BaseException) -> bool:
    """A collective that timed out: gloo's "Timed out waiting ...", nccl's blocking wait."""
    return isinstance(error, RuntimeError) and "timed out" in str(error).lower()


@contextlib.contextmanager
def stop_on_timeout(step: Callable[[], int], timeout_seconds: int) -> Iterator[None]:
    """Around the training loop: a collective timeout stops every rank and becomes one line
    naming the collective (where the traceback shows it) and the step (``step()`` then)."""
    try:
        yield
    except RuntimeError as e:
        if not is_timeout(e):
            raise
        rank = dist.get_rank()
        if _store is not None:
            _posted.set()
            with contextlib.suppress(Exception):
                _store.set(ABORT_KEY, str(rank))
        atexit.register(_exit_now, EXIT_CODES[RunStopped])
        raise RunStopped(
            f"rank {rank}: {_collective(e)} timed out after {timeout_seconds} s at step {step()} "
            f"(a rank stopped responding; every rank was stopped; {_where_it_hung()}; raise "
            "--comm.train_timeout_seconds if a step can legitimately wait longer)"
        ) from None


def _where_it_hung() -> str:
    """What the flight records say: the ranks that were behind and where the records are, from
    this rank's and the others' dumps (they write theirs on seeing the abort)."""
    flight_recorder.dump(dist.get_rank())
    folder = flight_recorder.wait_for_dumps(dist.get_world_size(), POLL_SECONDS + 1)
    if folder is None:
        return "see the ranks' logs for the one that did not arrive"
    behind = flight_recorder.laggards(folder) or "no rank behind in the records"
    return f"flight recorder: {behind}; records in {folder}"


def _exit_now(code: int) -> None:
    """At exit, once the error is reported: end the process before the interpreter's teardown,
    which blocks in a destructor of the broken groups for as long as the peer lives (measured:
    the launcher then stops this rank with SIGTERM, and its exit code 3 is lost)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    flush_logs()
    os._exit(code)


def _collective(error: BaseException) -> str:
    """The torch.distributed call the error surfaced in (its innermost public frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    names = [
        f.name
        for f in frames
        if f.filename.endswith("distributed_c10d.py") and not f.name.startswith("_")
    ]
    return names[-1] if names else "a collective"
