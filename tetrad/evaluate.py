"""``tetrad eval``: the loss and perplexity of a checkpoint on a dataset, under any layout
(``tetrad eval --nproc N --parallelism.* ...``; each rank runs ``python -m tetrad.evaluate``).

It is the trainer's validation, run once: the trainer is built as for training from the
checkpoint (its model only), and its ``Validator`` evaluates ``--validation.steps`` global
batches of the validation data (``--validation.*``, ``--data.*``), so the figure is the
``val_loss`` a run with the same options logs for that checkpoint. The options default to the
``config.toml`` of the run the checkpoint belongs to. Nothing is written beside the checkpoint:
the trainer's folder is a temporary one. Rank 0 prints the result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tetrad.cli import add_eval_arguments
from tetrad.components.checkpoint_states import CHECKPOINT_STATES
from tetrad.config import Config, config_from_args, saved_run_config, validate_config
from tetrad.config.args import ArgumentParser
from tetrad.errors import CheckpointError, reported


def resolve(args: argparse.Namespace) -> Config:
    """The config of the evaluation: the checkpoint's run's (unless --config is given) with the
    options given, loading the model only from the checkpoint and validating; checked before
    any process group starts."""
    checkpoint = Path(args.checkpoint)
    hf = (checkpoint / "config.json").is_file()
    if not hf and not (checkpoint / ".metadata").is_file():
        what = "is neither a DCP checkpoint (.metadata) nor a Hugging Face folder (config.json)"
        raise CheckpointError(
            f"--checkpoint {checkpoint} {what if checkpoint.exists() else 'does not exist'}"
        )
    config = (
        config_from_args(args)
        if hf
        else saved_run_config(args, checkpoint.parent.parent / "config.toml")
    )
    c = config.checkpoint
    c.enable, c.create_seed_checkpoint, c.last_save_in_hf = False, False, False
    c.initial_load_path, c.initial_load_in_hf = str(checkpoint), hf
    c.exclude_from_loading = [state for state in CHECKPOINT_STATES if state != "model"]
    config.validation.enable = True
    config.metrics.enable_tensorboard = config.metrics.enable_wandb = False
    config.profiling.enable = config.profiling.enable_memory_snapshot = False
    config.fault_tolerance.enable = False
    validate_config(config)
    return config


def run(args: argparse.Namespace) -> dict[str, float]:
    """This rank's part of the evaluation; rank 0 prints ``val_loss`` and ``val_perplexity``."""
    from tetrad.trainer import Trainer  # heavy imports only once the options are known good

    config = resolve(args)
    with tempfile.TemporaryDirectory(prefix="tetrad-eval-") as scratch:
        config.job.dump_folder = scratch
        trainer = Trainer(config)
        try:
            assert trainer.validator is not None  # resolve enabled it
            record = trainer.validator.evaluate(trainer.validation_loss_sum)
        finally:
            trainer.close()
    if trainer.rank == 0:
        v, t = config.validation, config.training
        print(
            f"val_loss {record['val_loss']!r} val_perplexity {record['val_perplexity']:.4f} "
            f"({v.steps} global batch(es) of {t.seq_len}-token sequences, {args.checkpoint})",
            flush=True,
        )
    return record


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="tetrad eval")
    add_eval_arguments(parser)
    with reported():
        run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
