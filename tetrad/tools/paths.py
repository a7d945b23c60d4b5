"""Checks on a folder a command is about to write into, made before it writes anything."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from tetrad.errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(path: Path, option: str) -> None:
    """``path`` is a folder this process can create files in, or can be created; a one-line
    ConfigError naming ``option`` if not."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        where = "is" if existing == path else f"would be inside {existing}, which is"
        raise ConfigError(f"{option} {path} {where} a file, not a folder; choose another path")
    try:  # the filesystem's answer (read-only mounts, permissions, root included)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise ConfigError(
            f"{option} {path} cannot be written ({os.strerror(err.errno or errno.EACCES)} in "
            f"{existing}); choose a writable folder"
        ) from None
