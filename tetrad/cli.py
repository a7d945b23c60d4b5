"""The ``tetrad`` command: one parser for every subcommand (``tetrad --help`` lists them).

A subcommand is a subparser with its own options, usually the config's through
``add_config_arguments``, and a ``run`` function that takes the parsed namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Literal

from tetrad.config import config_from_args, validate_config
from tetrad.config.args import CONFIG_USAGE, ArgumentParser, add_config_arguments, converter
from tetrad.errors import EXIT_CODES, INTERRUPTED, LAUNCHED_BY_TETRAD, reported
from tetrad.tools.exit import exit_without_collecting


def _positive(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {raw!r}")
    return int(raw)


def _non_negative(raw: str) -> int:
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"needs a non-negative integer, got {raw!r}")
    return int(raw)


_LAUNCH_OPTIONS = ("--nproc", "--max-restarts")


def _without_launch_options(argv: Sequence[str]) -> list[str]:
    """The train options to hand each rank: argv less ``--nproc N`` and ``--max-restarts R``
    (the launcher's, already parsed)."""
    kept, args = [], iter(argv)
    for arg in args:
        if arg in _LAUNCH_OPTIONS:
            next(args)
        elif not arg.startswith(tuple(f"{option}=" for option in _LAUNCH_OPTIONS)):
            kept.append(arg)
    return kept


def _train(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad.components.run_folder import hold_run_folder
    from tetrad.train import check_launch, train

    with reported():
        config = config_from_args(args)
        validate_config(config)
    if args.nproc == 1 and args.max_restarts == 0:
        train(config)
        return
    check_launch(config, args.nproc)
    with reported(), hold_run_folder(config, launcher=True):
        _launch(
            args.nproc,
            _without_launch_options(argv),
            stop_signals=config.job.stop_signals,
            max_restarts=args.max_restarts,
        )


def _launch(
    nproc: int, argv: Sequence[str], *, stop_signals: Sequence[str], max_restarts: int = 0
) -> None:
    """``torchrun --standalone --nproc-per-node=N -m tetrad.train ARGV``, its launcher in this
    process. When ranks stop on a reported error (exit code 2 or 3, the message in their error
    files) and the others were stopped by torchrun (a signal) or failed only after it, this
    command prints that message once and exits with that code, instead of torchrun's failure
    report.

    A stop signal (--job.stop_signals) sent to this process is passed on to the ranks, which
    stop together, save and exit 0; torchrun would instead give them 30 s and kill them. Ctrl-C
    (SIGINT, which reaches only this process: torchrun starts each rank in its own session) is
    passed on by torchrun and ends in one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # Its "failed (exitcode: N)" line; any other failure raises the full report below.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    # torchrun handles (and passes on to the ranks, then kills them after 30 s) the rest.
    torchrun_signals = [
        s for s in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if s not in stop_signals
    ]
    launch = ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    launch += [f"--signals-to-handle={','.join(torchrun_signals)}", "-m", "tetrad.train", *argv]
    os.environ[LAUNCHED_BY_TETRAD] = "1"  # the ranks inherit it
    for name in stop_signals:
        signal.signal(signal.Signals[name], _pass_on_to_children)
    try:
        run(get_args_parser().parse_args(launch))
    except SignalException as e:
        print(
            INTERRUPTED if e.sigval == signal.SIGINT else f"tetrad: stopped by {e.sigval.name}",
            file=sys.stderr,
        )
        raise SystemExit(128 + e.sigval) from None
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


def _pass_on_to_children(signum: int, frame: FrameType | None) -> None:
    """Send ``signum`` to this process's children: the ranks (Linux: /proc lists them)."""
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signum)


def _convert(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad.convert import main

    main(args)


def _report(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad.tools.report import write_report

    with reported():
        page = write_report([Path(run) for run in args.runs], args.out)
    print(f"tetrad: report of {len(args.runs)} run(s) written to {page}")


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
        "train",
        help="train a model",
        usage=f"%(prog)s [--nproc N] [--max-restarts R] {CONFIG_USAGE}",
    )
    train.add_argument(
        "--nproc",
        type=_positive,
        default=1,
        metavar="N",
        help="local processes to launch through torchrun (default: 1, no torchrun)",
    )
    train.add_argument(
        "--max-restarts",
        type=_non_negative,
        default=0,
        metavar="R",
        help="restart every rank up to R times when one fails (torchrun's elastic restart); "
        "with --checkpoint.enable each attempt resumes from the newest complete checkpoint "
        "(default: 0)",
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
    report = commands.add_parser(
        "report",
        help="an HTML page (and PNGs) of one run's curves, or several runs compared",
        usage="%(prog)s RUN [RUN ...] [--out DIR]",
        description="Loss, validation loss, lr, grad norm, tokens/s, MFU and memory against the "
        "step, from each\nrun folder's metrics.jsonl, the runs overlaid; with several runs, "
        "each run's loss minus the\nfirst's (the parity check after a change of layout); each "
        "run's config.toml beside the curves.\nNeeds matplotlib: pip install 'tetrad[report]'.",
    )
    report.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders (--job.dump_folder of tetrad train)"
    )
    report.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder to write report.html and the panels' PNGs into (default: <first RUN>/report)",
    )
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command ``argv`` (None: this process's command line, and the process ends with
    it)."""
    if argv is None:
        exit_without_collecting()
    argv = list(sys.argv[1:] if argv is None else argv)
    with reported():
        args = build_parser().parse_args(argv)
    args.run(args, argv[1:])


if __name__ == "__main__":
    main()
