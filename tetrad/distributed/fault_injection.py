"""``--debug.fault``: a rank that dies (SIGKILL) or stalls at a chosen step, to test elastic
restarts and hang detection with the real launcher, process groups and checkpoints.

Only the first attempt of an elastic job is hit (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so
the restarted group runs clean and the test can compare it with an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch.distributed as dist

from tetrad.config.job_config import DebugConfig
from tetrad.distributed.init import restart_count
from tetrad.errors import ConfigError
from tetrad.tools.logging import flush_logs

logger = logging.getLogger(__name__)


def check_fault_rank(debug: DebugConfig, world_size: int) -> None:
    """The fault must hit a rank that exists."""
    if debug.fault != "none" and debug.fault_rank >= world_size:
        raise ConfigError(
            f"--debug.fault_rank {debug.fault_rank} is not a rank of this run (world size "
            f"{world_size}): pick one within 0..{world_size - 1}"
        )


def maybe_inject_fault(debug: DebugConfig, step: int) -> None:
    """At the start of step ``step``: kill (SIGKILL) or stall (sleep, SIGTERM ignored) this
    rank if --debug.fault says so."""
    if debug.fault == "none":
        return
    check_fault_rank(debug, dist.get_world_size())
    if step != debug.fault_at_step or dist.get_rank() != debug.fault_rank or restart_count():
        return
    # A warning reaches the console from any rank; its record (with the time) the rank's log.
    logger.warning("--debug.fault %s: rank %d at step %d", debug.fault, dist.get_rank(), step)
    flush_logs()
    if debug.fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    # stall: the step's collectives never start, and SIGTERM is ignored, as by a rank that defers
    # it to finish its step: only SIGKILL ends this
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(3600)
