"""torchrun worker (or in-process with world size 1): one conversation's loss and gradients,
packed among others under block-causal masks, alone in its row with masks, and alone with plain
causal attention; each rank writes the gradients of the parameters it holds to
OUT/<name>_rank<R>.pt.

    torchrun --nproc-per-node 2 tests/distributed/document_mask_worker.py OUT NAME <train args>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tetrad.data import IGNORE_INDEX, Batch
from tetrad.train import parse_config
from tetrad.trainer import Trainer

LENGTHS = (20, 30, 14)
"""The packed row: documents A, B, C; B is the conversation studied, its labels the only
targets."""


def cases(vocab_size: int, seq_len: int) -> dict[str, Batch]:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, vocab_size, (n,), generator=g) for n in LENGTHS)
    start, pad = len(a), seq_len - len(b)
    packed = torch.cat([a, b, c])
    packed_labels = torch.full((seq_len,), IGNORE_INDEX)
    packed_labels[start : start + len(b) - 1] = b[1:]
    packed_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])
    alone = torch.cat([b, torch.zeros(pad, dtype=torch.long)])
    alone_labels = torch.full((seq_len,), IGNORE_INDEX)
    alone_labels[: len(b) - 1] = b[1:]
    alone_ids = torch.cat(
        [torch.zeros(len(b), dtype=torch.long), torch.ones(pad, dtype=torch.long)]
    )
    row = lambda x: x.expand(2, -1)  # noqa: E731 - [T] → [2, T]: two pipeline micro-batches
    return {
        "packed": Batch(row(packed), row(packed_labels), row(packed_ids)),
        "alone": Batch(row(alone), row(alone_labels), row(alone_ids)),
        "plain": Batch(row(alone), row(alone_labels)),
    }


def main(out: Path, name: str, argv: list[str]) -> None:
    trainer = Trainer(parse_config(argv))
    try:
        results = {}
        vocab, seq_len = trainer.tokenizer.vocab_size, trainer.config.training.seq_len
        for case, batch in cases(vocab, seq_len).items():
            for part in trainer.model_parts:
                part.zero_grad(set_to_none=True)
            loss = trainer.forward_backward([batch])
            grads = {
                fqn: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                for part in trainer.model_parts
                for fqn, p in part.named_parameters()
                if p.grad is not None
            }
            results[case] = {"loss": loss.item(), "grads": grads}
        torch.save(results, out / f"{name}_rank{trainer.rank}.pt")
    finally:
        trainer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
