"""torchrun worker: load a Hugging Face folder into a sharded model, check every tensor against
transformers' own load, and export it again.

``fsdp``: both ranks hold a shard of every tensor. ``stages``: rank 0 holds the embedding and
block 0, rank 1 block 1 and the head, as pipeline stages do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from tetrad.components.hf_checkpoint import load_hf_weights, save_hf_weights


class SameKeys:
    """The adapter of a model that already uses Hugging Face's names and layouts."""

    def __init__(self, config: transformers.PretrainedConfig) -> None:
        self.config = config
        self.tied_keys: set[str] = set()

    def hf_keys(self, fqn: str) -> list[str]:
        return [fqn]

    def to_hf(self, fqn: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def from_hf(self, fqn: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        (tensor,) = tensors
        return tensor

    def hf_config(self) -> dict:
        return self.config.to_dict()


def main(mode: str, src: Path, dst: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = transformers.AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        layers = model.model.layers
        model.model.layers = nn.ModuleDict({str(rank): layers[rank]})
        if rank == 0:
            model.model.norm, model.lm_head = None, None
        else:
            model.model.embed_tokens = None
    model.to_empty(device="cpu")
    load_hf_weights(model, src, SameKeys(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(src).state_dict()
    for fqn, tensor in model.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        assert torch.equal(full, reference[fqn]), fqn
    save_hf_weights(model, dst, SameKeys(config), max_shard_size_mb=0.05)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
