"""Single-process reference run for parity tests: the same global batch a data-parallel run
sees, merged into one batch and trained without any parallelism.

    python -m tests.distributed.reference --dp 2 --accum 1 <tetrad train arguments>
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch

from tetrad.data import Batch, build_dataloader
from tetrad.train import parse_config
from tetrad.trainer import Trainer


class MergedBatches:
    """Per step: every micro-batch of every dp rank (built exactly as those ranks build theirs),
    concatenated along the batch dimension (no per-source or overlong counts to log)."""

    def __init__(self, trainer: Trainer, dp: int, accum: int, local_batch: int) -> None:
        self.args = trainer, dp, accum, local_batch

    def __iter__(self) -> Iterator[Batch]:
        return merged_batches(*self.args)

    def source_counts(self) -> dict[str, int]:
        return {}

    def overlong_counts(self) -> None:
        return None


def merged_batches(trainer: Trainer, dp: int, accum: int, local_batch: int) -> Iterator[Batch]:
    """The batches of ``MergedBatches``."""
    config = trainer.config
    loaders = [
        iter(
            build_dataloader(
                config.data,
                tokenizer=trainer.tokenizer,
                seq_len=config.training.seq_len,
                batch_size=local_batch,
                dp_rank=rank,
                dp_world_size=dp,
            )
        )
        for rank in range(dp)
    ]
    while True:
        parts = [next(loader) for loader in loaders for _ in range(accum)]
        ids = [p.document_ids for p in parts]
        yield Batch(
            torch.cat([p.inputs for p in parts]),
            torch.cat([p.labels for p in parts]),
            None if ids[0] is None else torch.cat(ids),
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dp", type=int, required=True)
    parser.add_argument("--accum", type=int, default=1)
    args, train_args = parser.parse_known_args()
    config = parse_config(train_args)
    local_batch = config.training.local_batch_size
    config.training.local_batch_size = args.dp * args.accum * local_batch
    config.training.global_batch_size = -1
    p = config.parallelism
    p.dp_shard = p.dp_replicate = p.tp = p.pp = p.cp = 1
    trainer = Trainer(config)
    trainer.dataloader = MergedBatches(trainer, args.dp, args.accum, local_batch)  # type: ignore[assignment]
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
