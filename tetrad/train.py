"""Entry point of one training process (``torchrun -m tetrad.train`` or ``tetrad train``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tetrad.config import Config, help_text, load_config, validate_config, validate_device
from tetrad.errors import UserError


def parse_config(argv: Sequence[str]) -> Config:
    """Load and validate the config, or print --help / a one-line error and exit."""
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    try:
        config = load_config(argv)
        validate_config(config)
    except UserError as e:
        print(f"tetrad: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


def check_device(config: Config) -> None:
    """What the options need of this machine's device (``validate_device``), checked where
    ``tetrad train --nproc`` launches the ranks: one line and exit 2 instead of one per rank."""
    from tetrad.distributed.init import device_capability, device_type

    try:
        validate_device(config, device_type(), device_capability())
    except UserError as e:
        print(f"tetrad: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    from tetrad.trainer import Trainer  # heavy imports only once the config is known good

    try:
        trainer = Trainer(config)
    except UserError as e:
        print(f"tetrad: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
