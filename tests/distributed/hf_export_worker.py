"""torchrun worker: train an HF model with `tetrad train` arguments, export it in HF format
from the sharded parameters, and save the logits the sharded model computes for fixed tokens.

    torchrun --nproc-per-node 4 tests/distributed/hf_export_worker.py OUT <tetrad train args>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from tetrad.components.hf_checkpoint import save_hf_weights
from tetrad.models.hf import HFStateDictAdapter
from tetrad.train import parse_config
from tetrad.trainer import Trainer

TOKENS = torch.arange(128).reshape(2, 64)


def main(out: Path, argv: list[str]) -> None:
    trainer = Trainer(parse_config(argv))
    try:
        trainer.train()
        (model,) = trainer.model_parts
        save_hf_weights(model, out / "export", HFStateDictAdapter(trainer.model_config))
        model.eval()
        with torch.no_grad():
            logits = model(TOKENS.to(trainer.device))
        if isinstance(logits, DTensor):  # vocab-sharded for loss parallel
            logits = logits.full_tensor()
        if trainer.rank == 0:
            torch.save(logits.cpu(), out / "logits.pt")
    finally:
        trainer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
