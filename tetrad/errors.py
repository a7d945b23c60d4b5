"""Errors the user fixes. Each message is one line saying what is wrong and how to fix it; the
command line prints it and exits 2, and nothing on disk has changed. Below every layer: any
module may raise them."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
    """Bad input, not a bug: printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A configuration (options, TOML, model definition) that cannot run as written."""


class CheckpointError(UserError):
    """A checkpoint or weights folder that is missing, incomplete or does not fit the model."""


class DataError(UserError):
    """A dataset, data file or tokenizer that cannot be read as asked."""


@contextlib.contextmanager
def reported(*, quiet: bool = False) -> Iterator[None]:
    """Around a command: a UserError becomes ``tetrad: error: <message>`` on stderr (unless
    ``quiet``: another process prints it) and exit code 2, instead of a traceback."""
    try:
        yield
    except UserError as e:
        if not quiet:
            print(f"tetrad: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
