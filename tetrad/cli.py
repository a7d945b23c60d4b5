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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Literal

from tetrad.config import Config, config_from_args, validate_config
from tetrad.config.args import CONFIG_USAGE, ArgumentParser, add_config_arguments, converter
from tetrad.errors import EXIT_CODES, INTERRUPTED, LAUNCHED_BY_TETRAD, ConfigError, reported
from tetrad.tools.exit import exit_without_collecting
from tetrad.tools.progress import quiet_library_bars


def _positive(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {raw!r}")
    return int(raw)


def _non_negative(raw: str) -> int:
    if not raw.isdigit():
        raise argparse.ArgumentTypeError(f"needs a non-negative integer, got {raw!r}")
    return int(raw)


_LAUNCH_OPTIONS = ("--nproc", "--max-restarts")


def _add_nproc(parser: argparse.ArgumentParser, more_help: str) -> None:
    parser.add_argument(
        "--nproc",
        type=_positive,
        default=1,
        metavar="N",
        help=f"local processes to launch through torchrun {more_help}",
    )


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
    if args.dry_run or args.world_size is not None or args.dry_run_ranks is not None:
        _dry_run(config, args)
        return
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


def _dry_run(config: Config, args: argparse.Namespace) -> None:
    from tetrad.plan.dry_run import dry_run, format_summaries

    with reported():
        if not args.dry_run:
            raise ConfigError("--world-size and --dry-run-ranks go with --dry-run")
        world_size = args.world_size or args.nproc
        summaries = dry_run(config, world_size, args.dry_run_ranks)
    print(format_summaries(config, world_size, summaries))


def _estimate(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad.plan.estimate import estimate, format_estimate

    with reported():
        config = config_from_args(args)
        if not 0 <= args.rank < args.world_size:
            raise ConfigError(f"--rank {args.rank} is not a rank of world size {args.world_size}")
        memory = estimate(config, args.world_size, args.rank)
    print(format_estimate(config, args.world_size, args.rank, memory, args.gpu_memory_gib))


def _plan(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad.plan.planner import Planner, format_plan

    with reported():
        planner = Planner(config_from_args(args), args.gpus, args.gpu_memory_gib, args.gpu)
        verdicts = planner.plan()
    print(format_plan(planner, verdicts, args.top))


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"needs a positive number, got {raw!r}")
    return value


def _ranks(raw: str) -> list[int]:
    if not all(r.isdigit() for r in raw.split(",")):
        raise argparse.ArgumentTypeError(f"needs comma-separated ranks, got {raw!r}")
    return [int(r) for r in raw.split(",")]


def _launch(
    nproc: int,
    argv: Sequence[str],
    *,
    stop_signals: Sequence[str],
    max_restarts: int = 0,
    module: str = "tetrad.train",
) -> None:
    """``torchrun --standalone --nproc-per-node=N -m MODULE ARGV``, its launcher in this
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
    launch += [f"--signals-to-handle={','.join(torchrun_signals)}", "-m", module, *argv]
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


def _generate(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad import generate

    _run_or_launch(args, argv, generate.resolve, generate.run, module="tetrad.generate")


def _eval(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from tetrad import evaluate

    _run_or_launch(args, argv, evaluate.resolve, evaluate.run, module="tetrad.evaluate")


def _run_or_launch(
    args: argparse.Namespace,
    argv: Sequence[str],
    resolve: Callable[[argparse.Namespace], object],
    run: Callable[[argparse.Namespace], object],
    *,
    module: str,
) -> None:
    """A command that runs on --nproc ranks: in this process on one, else through torchrun
    (``python -m MODULE`` per rank) once ``resolve`` found the options good, so bad input is
    one line before any rank starts."""
    with reported():
        if args.nproc == 1:
            run(args)
            return
        resolve(args)
        _launch(args.nproc, _without_launch_options(argv), stop_signals=(), module=module)


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
        usage=f"%(prog)s [--nproc N] [--max-restarts R] [--dry-run --world-size N] {CONFIG_USAGE}",
    )
    _add_nproc(train, "(default: 1, no torchrun)")
    train.add_argument(
        "--max-restarts",
        type=_non_negative,
        default=0,
        metavar="R",
        help="restart every rank up to R times when one fails (torchrun's elastic restart); "
        "with --checkpoint.enable each attempt resumes from the newest complete checkpoint "
        "(default: 0)",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="build the mesh, the model on meta, the pipeline split and the parallelized model "
        "of chosen ranks of a --world-size run in this one CPU process (a fake process group), "
        "print what each rank holds; allocates, reads and writes nothing",
    )
    train.add_argument(
        "--world-size",
        type=_positive,
        default=None,
        metavar="N",
        help="with --dry-run: the ranks of the run to rehearse (default: --nproc)",
    )
    train.add_argument(
        "--dry-run-ranks",
        type=_ranks,
        default=None,
        metavar="R,R",
        help="with --dry-run: the ranks to build (default: 0, the first of each pipeline "
        "stage, the last)",
    )
    add_config_arguments(train)
    train.set_defaults(run=_train)
    estimate = commands.add_parser(
        "estimate",
        help="a rank's peak memory in training, by component, without the GPUs",
        usage=f"%(prog)s --world-size N [--gpu-memory-gib G] [--rank R] {CONFIG_USAGE}",
        description="Builds the rank's model as `tetrad train` would for a GPU run of N ranks "
        "(a fake process group\nin this CPU process), and runs two training steps on fake "
        "tensors under torch's memory\ntracker: parameters, gradients, optimizer states, "
        "activations (under each activation\ncheckpointing mode), backward temporaries and "
        "FSDP's communication buffers at the peak.",
    )
    estimate.add_argument(
        "--world-size", type=_positive, required=True, metavar="N", help="ranks of the run"
    )
    estimate.add_argument(
        "--gpu-memory-gib",
        type=_positive_float,
        default=None,
        metavar="G",
        help="say whether the peak fits in G GiB per GPU",
    )
    estimate.add_argument(
        "--rank", type=_non_negative, default=0, metavar="R", help="the rank (default: 0)"
    )
    add_config_arguments(estimate)
    estimate.set_defaults(run=_estimate)
    plan = commands.add_parser(
        "plan",
        help="the layouts of a model on a cluster that fit, fastest first",
        usage=f"%(prog)s --gpus N --gpu-memory-gib G [--gpu {{h100,h200,a100}}] [--top K] "
        f"{CONFIG_USAGE}",
        description="Enumerates FSDP × TP × PP layouts, activation checkpointing modes and "
        "local batches, keeps\nthose whose estimated peak (tetrad estimate's) fits, and ranks "
        "them by an estimated step time\n(compute at an MFU ceiling, FSDP and TP traffic over "
        "the GPU's stated links, pipeline bubble).",
    )
    plan.add_argument("--gpus", type=_positive, required=True, metavar="N", help="GPUs in all")
    plan.add_argument(
        "--gpu-memory-gib", type=_positive_float, required=True, metavar="G", help="per GPU"
    )
    plan.add_argument("--gpu", default="h100", metavar="KIND", help="h100 (default), h200 or a100")
    plan.add_argument(
        "--top", type=_positive, default=10, metavar="K", help="layouts to print (default: 10)"
    )
    add_config_arguments(plan)
    plan.set_defaults(run=_plan)
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
    _add_generate_parser(commands)
    _add_eval_parser(commands)
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


GENERATE_CONFIG_SECTIONS = ("model", "data", "parallelism", "training", "comm")
"""The config options ``tetrad generate`` takes; the rest come from the run's config.toml."""


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tetrad generate``, which its ranks (``python -m tetrad.generate``) parse
    too; here, so building this parser imports no torch."""
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a DCP checkpoint folder (a run's checkpoint/step-N); optional with --model.name hf",
    )
    parser.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    parser.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        metavar="N",
        help="generate at most N tokens, fewer if the end-of-text token comes (default: 128)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest (0 = all)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default: 1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="sampling seed (default: 0)"
    )
    parser.add_argument(
        "--out",
        metavar="FILE.json",
        help="also write the prompt's and the completion's token ids, text and timings here",
    )
    add_config_arguments(parser, only=GENERATE_CONFIG_SECTIONS)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tetrad eval`` and of its ranks (``python -m tetrad.evaluate``)."""
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        required=True,
        help="a DCP checkpoint folder (a run's checkpoint/step-N) or a Hugging Face folder",
    )
    add_config_arguments(parser)


def _add_generate_parser(commands: argparse._SubParsersAction[ArgumentParser]) -> None:
    generate = commands.add_parser(
        "generate",
        help="sample text from a checkpoint, on one process or tensor parallel",
        usage="%(prog)s (--checkpoint DIR | --model.name hf --model.hf_path DIR) "
        "(--prompt TEXT | --prompt-file FILE) [--max-new-tokens N] [--temperature T] "
        "[--top-k K] [--top-p P] [--seed S] [--nproc N --parallelism.tp N] [--model.* ...]",
        description="Continue a prompt with a trained model: a DCP checkpoint read with its "
        "run's config.toml, or\na Hugging Face model. Greedy at --temperature 0. Rank 0 prints "
        "the completion (stdout)\nand its speed (stderr).",
    )
    _add_nproc(generate, "(e.g. with --parallelism.tp N; default: 1)")
    add_generate_arguments(generate)
    generate.set_defaults(run=_generate)


def _add_eval_parser(commands: argparse._SubParsersAction[ArgumentParser]) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="loss and perplexity of a checkpoint on a dataset, under any layout",
        usage=f"%(prog)s --checkpoint DIR [--nproc N] {CONFIG_USAGE}",
        description="The trainer's validation of a checkpoint: --validation.steps global "
        "batches of the validation\ndata (--validation.*, --data.*), under any layout "
        "(--parallelism.*). The options default\nto the config.toml of the run the checkpoint "
        "belongs to. Rank 0 prints val_loss and val_perplexity.",
    )
    _add_nproc(evaluate, "(default: 1)")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_eval)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command ``argv`` (None: this process's command line, and the process ends with
    it)."""
    if argv is None:
        exit_without_collecting()
    quiet_library_bars()
    argv = list(sys.argv[1:] if argv is None else argv)
    with reported():
        args = build_parser().parse_args(argv)
    args.run(args, argv[1:])


if __name__ == "__main__":
    main()
