"""Entry point of one training process (``torchrun -m tetrad.train`` or ``tetrad train``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from tetrad.components.run_folder import hold_run_folder
from tetrad.config import Config, load_config, validate_config, validate_device
from tetrad.errors import reported
from tetrad.tools.exit import exit_without_collecting
from tetrad.tools.progress import quiet_library_bars

logger = logging.getLogger(__name__)


def parse_config(argv: Sequence[str]) -> Config:
    """The validated config the options describe; --help lists them, a bad one is one line on
    stderr and exit 2."""
    with reported():
        config = load_config(argv)
        validate_config(config)
    return config


def check_launch(config: Config, world_size: int) -> None:
    """What ``tetrad train --nproc`` checks once before it launches the ranks, so a config they
    cannot run is one line and exit 2 rather than one error per rank: what the options need of
    this machine's device (``validate_device``), the parallelism degrees against the world
    size, and the local data files (``check_local_files``)."""
    from tetrad.data.sources import check_local_files
    from tetrad.distributed.fault_injection import check_fault_rank
    from tetrad.distributed.init import device_capability, device_type
    from tetrad.distributed.parallel_dims import ParallelDims

    with reported():
        validate_device(config, device_type(), device_capability())
        ParallelDims.from_config(config.parallelism, world_size)
        check_fault_rank(config.debug, world_size)
        check_local_files(config.data)


def train(config: Config) -> None:
    """Run the training; rank 0 holds the run folder (``hold_run_folder``) from before anything
    is written until the end, unless the launcher holds it for every rank."""
    from tetrad.distributed.hang import stop_on_timeout
    from tetrad.distributed.init import restart_count
    from tetrad.trainer import Trainer  # heavy imports only once the config is known good

    rank_0 = int(os.environ.get("RANK", "0")) == 0
    with reported(), hold_run_folder(config) if rank_0 else contextlib.nullcontext():
        trainer = Trainer(config)
        if attempt := restart_count():
            logger.info(
                "restart %d of %s: resuming from %s",
                attempt, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"),
                trainer.resume_from or "the start (no complete checkpoint in its folder)",
            )  # fmt: skip
        try:
            with stop_on_timeout(
                lambda: trainer.train_state.step, config.comm.train_timeout_seconds
            ):
                trainer.train()
        finally:
            trainer.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Train with the options ``argv`` (None: this process's command line, and the process ends
    with it)."""
    if argv is None:
        exit_without_collecting()
    quiet_library_bars()
    train(parse_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
