"""Errors the user fixes, and faults a run stops on. Each message is one line saying what is wrong
and how to fix it; the command line prints it and exits 2 (bad input: nothing on disk has changed)
or 3 (a fault: the last good checkpoint is intact). Below every layer: any module may raise them."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """Bad input, not a bug: printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A configuration (options, TOML, model definition) that cannot run as written."""


class CheckpointError(UserError):
    """A checkpoint or weights folder that is missing, incomplete or does not fit the model."""


class DataError(UserError):
    """A dataset, data file or tokenizer that cannot be read as asked."""


class NetworkError(UserError):
    """A hub model, tokenizer or dataset that could not be fetched (no network, no such id)."""


class RunStopped(Exception):
    """A fault the run cannot go on from (a non-finite loss, a rank that stopped responding):
    printed as one line, exit code 3."""


EXIT_CODES: dict[type[Exception], int] = {UserError: 2, RunStopped: 3}
"""Exit code of each reported error class; the launcher prints a rank's message once for these."""

LAUNCHED_BY_TETRAD = "TETRAD_LAUNCHED"
"""Set in the ranks ``tetrad train --nproc`` launches: it prints their errors once itself."""


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Around a command: a UserError (RunStopped) becomes ``tetrad: error: <message>`` on stderr
    and exit code 2 (3), not a traceback. A rank under torchrun also leaves the message in its
    error file, for torchrun's failure report; under ``tetrad train --nproc`` only there, for
    the launcher to print once rather than once per rank. There, any other exception goes to the
    error file too (with its traceback, as torchrun's ``record`` writes it) and exit code 1: the
    launcher shows it, unless it only followed another rank's reported error (a collective
    that lost its peer), which it then shows alone."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    launched = bool(error_file and os.environ.get(LAUNCHED_BY_TETRAD))
    try:
        yield
    except (UserError, RunStopped) as e:
        code = next(code for kind, code in EXIT_CODES.items() if isinstance(e, kind))
        if error_file:
            record = {"message": str(e), "timestamp": int(time.time())}
            Path(error_file).write_text(json.dumps(record))
        if not launched:
            print(f"tetrad: error: {e}", file=sys.stderr)
        raise SystemExit(code) from None
    except Exception as e:
        if not (launched and error_file):
            raise
        info = {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}
        record = {"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": info}}
        Path(error_file).write_text(json.dumps(record))
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if not launched:  # else the launcher says it once
            print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None


INTERRUPTED = "tetrad: interrupted; checkpoints already written are kept (rerun to resume)"
