"""One run at a time in a run folder, and only in one that can be written.

``hold_run_folder`` checks, before anything is written, that the dump folder and the checkpoint
folder are folders this process can write (a read-only one, or a file in the place of one, is a
one-line error), then holds an exclusive ``flock`` on ``<dump_folder>/.lock`` for the run's life.
A second run in the same folder gets a one-line error naming the holder's pid and host (written
into the file). The kernel drops a flock when its process dies, so a run killed with SIGKILL
leaves no lock behind; the file itself is removed when the holder lets go, and a folder the hold
created is removed again if it is still empty, so a run refused at start-up leaves no trace.

Rank 0 holds it (``tetrad.train``); ``tetrad train --nproc`` holds it in the launcher, for all
its ranks and restarts, and tells rank 0 so through ``HELD_BY_LAUNCHER``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from tetrad.config.job_config import Config
from tetrad.errors import UserError
from tetrad.tools.paths import check_writable_folder

LOCK_FILE = ".lock"

HELD_BY_LAUNCHER = "TETRAD_RUN_FOLDER_HELD"
"""Set by the launcher to the run folder it holds: its ranks do not take the lock again."""


class RunFolderBusy(UserError):
    """Another run holds the run folder."""


def check_run_folder(config: Config) -> None:
    """The dump and checkpoint folders can be written; raises a one-line ConfigError if not."""
    dump = Path(config.job.dump_folder)
    check_writable_folder(dump, "--job.dump_folder")
    if config.checkpoint.enable:
        check_writable_folder(dump / config.checkpoint.folder, "--checkpoint.folder")


def _created_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` will create, innermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _lock(path: Path) -> int:
    """An fd holding an exclusive flock on ``path`` (the file ``path`` names now)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"run folder {path.parent} is in use by another run ({holder}); wait for it to "
                "finish, or pick another --job.dump_folder"
            ) from None
        # A holder letting go removes the file: locked a removed file? Then open it anew.
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold_run_folder(config: Config, *, launcher: bool = False) -> Iterator[None]:
    """Check the run's folders, then hold the run folder's lock until the block ends; a
    ``launcher`` holds it for the ranks it starts in the block."""
    dump = Path(config.job.dump_folder).resolve()
    if os.environ.get(HELD_BY_LAUNCHER) == str(dump):
        yield
        return
    check_run_folder(config)
    created = _created_folders(dump)
    dump.mkdir(parents=True, exist_ok=True)
    lock = dump / LOCK_FILE
    try:
        fd = _lock(lock)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        if launcher:
            os.environ[HELD_BY_LAUNCHER] = str(dump)  # the ranks inherit it
        yield
    finally:
        if launcher:
            os.environ.pop(HELD_BY_LAUNCHER, None)
        with contextlib.suppress(FileNotFoundError):  # while held: a waiter retries anew
            os.unlink(lock)
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
            folder.rmdir()
