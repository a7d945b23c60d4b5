"""The ``tetrad`` command: one parser for every subcommand (``tetrad --help`` lists them).

A subcommand is a subparser with its own options, usually the config's through
``add_config_arguments``, and a ``run`` function that takes the parsed namespace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Literal

from tetrad.config import config_from_args, validate_config
from tetrad.config.args import CONFIG_USAGE, ArgumentParser, add_config_arguments, converter
from tetrad.errors import EXIT_CODES, LAUNCHED_BY_TETRAD, reported


def _positive(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {raw!r}")
    return int(raw)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The train options to hand each rank: argv less ``--nproc N`` (already parsed)."""
    kept, args = [], iter(argv)
    for arg in args:
        if arg == "--nproc":
            next(args)
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad.components.run_folder import hold_run_folder
    from tetrad.train import check_launch, train

    with reported():
        config = config_from_args(args)
        validate_config(config)
    if args.nproc == 1:
        train(config)
        return
    check_launch(config, args.nproc)
    with reported(), hold_run_folder(config, launcher=True):
        _launch(args.nproc, _without_nproc(argv))


def _launch(nproc: int, argv: Sequence[str]) -> None:
    """``torchrun --standalone --nproc-per-node=N -m tetrad.train ARGV``, its launcher in this
    process. When ranks stop on a reported error (exit code 2 or 3, the message in their error
    files) and the others were stopped by torchrun (a signal) or failed only after it, this
    command prints that message once and exits with that code, instead of torchrun's failure
    report."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # Its "failed (exitcode: N)" line; any other failure raises the full report below.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    launch = ["--standalone", f"--nproc-per-node={nproc}", "-m", "tetrad.train", *argv]
    os.environ[LAUNCHED_BY_TETRAD] = "1"  # the ranks inherit it
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as e:
        reported_codes = set(EXIT_CODES.values())
        stopped = {rank: f for rank, f in e.failures.items() if f.exitcode in reported_codes}
        # Another rank's failure after (or in the same second as) a reported error is its
        # consequence: a collective that lost its peer. One before it is a fault of its own.
        since = min((f.timestamp for f in stopped.values()), default=None)
        if since is None or any(
            f.exitcode > 0 and f.exitcode not in reported_codes and f.timestamp < since
            for f in e.failures.values()
        ):
            raise
        first = stopped[min(stopped)]
        print(f"tetrad: error: {first.message}", file=sys.stderr)
        raise SystemExit(first.exitcode) from None


def _convert(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad.convert import main

    main(args)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="tetrad",
        description="PyTorch-native LLM training; `tetrad <command> --help` lists its options.",
        epilog="`tetrad train --nproc N ...` launches N local processes through torchrun; on "
        "several nodes,\nrun `torchrun ... -m tetrad.train ...` on each (see "
        "scripts/multinode.slurm).",
    )
    commands = parser.add_subparsers(title="commands", metavar="<command>", required=True)
    train = commands.add_parser(
        "train", help="train a model", usage=f"%(prog)s [--nproc N] {CONFIG_USAGE}"
    )
    train.add_argument(
        "--nproc",
        type=_positive,
        default=1,
        metavar="N",
        help="local processes to launch through torchrun (default: 1, no torchrun)",
    )
    add_config_arguments(train)
    train.set_defaults(run=_train)
    convert = commands.add_parser(
        "convert",
        help="a model's weights between a DCP checkpoint and a Hugging Face folder",
        usage="%(prog)s SRC DST [--dtype {float32,bfloat16}] [--config FILE.toml] "
        "[--model.* --data.* ...]",
        description="SRC a DCP checkpoint folder (step-N)  → DST a Hugging Face folder "
        "(safetensors + config.json)\nSRC a Hugging Face folder             → DST a model-only "
        "DCP checkpoint (for\n                                        "
        "--checkpoint.initial_load_path)\nThe model (--model.*, --data.tokenizer) defaults to "
        "the config.toml of the run that holds\na DCP source; give it explicitly for a Hugging "
        "Face source.",
    )
    convert.add_argument("src", metavar="SRC", help="the checkpoint or folder to convert")
    convert.add_argument("dst", metavar="DST", help="where to write the result (must not exist)")
    convert.add_argument(
        "--dtype",
        type=converter(Literal["float32", "bfloat16"]),
        default="float32",
        metavar="{float32,bfloat16}",
        help="dtype of the written weights (default: float32)",
    )
    add_config_arguments(convert, only=("model", "data"))
    convert.set_defaults(run=_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    with reported():
        args = build_parser().parse_args(argv)
    args.run(args, argv[1:])


if __name__ == "__main__":
    main()
