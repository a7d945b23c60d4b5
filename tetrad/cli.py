"""The ``tetrad`` command: ``tetrad train [--nproc N] [--config FILE] [--section.field=VALUE ...]``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

USAGE = """usage: tetrad <command> [options]

commands:
  train    train a model (tetrad train --help lists every option)
  convert  a model's weights between a DCP checkpoint and a Hugging Face folder
           (tetrad convert --help)

`tetrad train --nproc N ...` launches N local processes through torchrun;
on several nodes, run `torchrun ... -m tetrad.train ...` on each (see scripts/multinode.slurm)."""


def _pop_nproc(argv: list[str]) -> int:
    """Remove ``--nproc N`` / ``--nproc=N`` from argv and return N (1 if absent)."""
    for i, arg in enumerate(argv):
        if arg == "--nproc" or arg.startswith("--nproc="):
            value = (
                arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            )
            del argv[i : i + (1 if "=" in arg else 2)]
            if not value.isdigit() or int(value) < 1:
                print(
                    f"tetrad: error: --nproc needs a positive integer, got {value!r}",
                    file=sys.stderr,
                )
                raise SystemExit(2)
            return int(value)
    return 1


def train(argv: list[str]) -> None:
    from tetrad.train import check_device, main, parse_config

    nproc = _pop_nproc(argv)
    if nproc == 1:
        main(argv)
        return
    check_device(parse_config(argv))  # fail on a bad config once, before any process starts
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    os.execv(sys.executable, [*torchrun, f"--nproc-per-node={nproc}", "-m", "tetrad.train", *argv])


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "train":
        train(rest)
    elif command == "convert":
        from tetrad.convert import main as convert

        convert(rest)
    else:
        print(f"tetrad: error: unknown command {command!r}; see `tetrad --help`", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
