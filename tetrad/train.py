"""Entry point of one training process (``torchrun -m tetrad.train`` or ``tetrad train``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tetrad.config import Config, load_config, validate_config, validate_device
from tetrad.errors import reported


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
    this machine's device (``validate_device``) and the parallelism degrees against the world
    size."""
    from tetrad.distributed.init import device_capability, device_type
    from tetrad.distributed.parallel_dims import ParallelDims

    with reported():
        validate_device(config, device_type(), device_capability())
        ParallelDims.from_config(config.parallelism, world_size)


def train(config: Config) -> None:
    from tetrad.trainer import Trainer  # heavy imports only once the config is known good

    with reported():
        trainer = Trainer(config)
        try:
            trainer.train()
        finally:
            trainer.close()


def main(argv: Sequence[str] | None = None) -> None:
    train(parse_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
