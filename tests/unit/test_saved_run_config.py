"""The config `tetrad generate` and `tetrad eval` read a run's checkpoint with: the run's saved
config.toml under the options given, but the layout only as given."""

from __future__ import annotations

import argparse
from pathlib import Path

from tetrad.config import save_config, saved_run_config
from tetrad.config.args import ArgumentParser, add_config_arguments
from tetrad.config.loader import load_config


def _args(*argv: str) -> argparse.Namespace:
    parser = ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_the_runs_options_but_the_commands_layout(tmp_path: Path) -> None:
    saved = tmp_path / "config.toml"
    run = ["--model.flavor=tiny", "--training.seq_len=64", "--parallelism.dp_shard=2"]
    save_config(load_config([*run, "--parallelism.tp=2", "--parallelism.pp=2"]), saved)

    config = saved_run_config(_args("--parallelism.tp=2", "--training.seq_len=32"), saved)
    assert (config.model.flavor, config.training.seq_len) == ("tiny", 32)
    p = config.parallelism
    assert (p.dp_shard, p.tp, p.pp) == (-1, 2, 1)

    # --config names the file to read, layout included; no saved file: the defaults.
    config = saved_run_config(_args(f"--config={saved}"), tmp_path / "elsewhere.toml")
    assert (config.parallelism.dp_shard, config.parallelism.tp) == (2, 2)
    assert saved_run_config(_args(), tmp_path / "none.toml").model.flavor == "debug"
