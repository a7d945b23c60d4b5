"""Context parallel: every cp rank holds 1/cp of each sequence and attends over all of it.

Each sequence is cut into 2·cp chunks and rank r keeps chunks r and 2·cp − 1 − r: under a causal
mask an early chunk attends to few keys and its mirror to many, so every rank does the same
work. Attention all-gathers K and V over the cp mesh with autograd-aware functional collectives
(their backward reduce-scatters the K/V gradients) and runs each local query chunk against the
keys up to the chunk's end with a lower-right-aligned causal mask
(``tetrad.models.attention.ContextParallelAttention``). This is the design of the
Llama 3 paper; it trains on CPU and GPU alike, where PyTorch's ring-attention
``context_parallel`` is CUDA-only, and the lower-right causal bias keeps SDPA's flash and
memory-efficient kernels usable on GPU (no dense mask is built).

The model stays single-device code: the trainer sets that attention as the model's attention
function for the whole run (activation checkpointing's recomputation included) and passes each
token's position to the rotary embedding.
"""

from __future__ import annotations

import torch
from torch.distributed._functional_collectives import all_gather_single
from torch.distributed.device_mesh import DeviceMesh


def chunk_order(cp: int) -> list[int]:
    """Sequence chunks in the order the ranks hold them: rank r's two chunks at 2r and 2r+1."""
    return [chunk for rank in range(cp) for chunk in (rank, 2 * cp - 1 - rank)]


class ContextParallel:
    """Shards batches along the sequence and gathers keys and values back for attention
    (``tetrad.models.attention.ContextParallelAttention``)."""

    def __init__(self, cp_mesh: DeviceMesh, seq_len: int) -> None:
        cp = cp_mesh.size()
        self.mesh, self.cp, self.rank = cp_mesh, cp, cp_mesh.get_local_rank()
        self.chunk = seq_len // (2 * cp)
        order = chunk_order(cp)
        self.local_chunks = order[2 * self.rank : 2 * self.rank + 2]
        # Where sequence chunk i sits among the gathered (rank-ordered) chunks.
        self.gathered_index = sorted(range(2 * cp), key=order.__getitem__)
        self.positions = torch.cat(
            [torch.arange(c * self.chunk, (c + 1) * self.chunk) for c in self.local_chunks]
        )  # [seq_len // cp]: this rank's tokens, as rows of the rotary table

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, seq_len] → this rank's [B, seq_len // cp] (its two chunks, concatenated)."""
        return batch[:, self.positions.to(batch.device)]

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T/cp, D] on each rank → [B, H, T, D], the whole sequence in order. The
        all-gather is autograd-aware: its backward reduce-scatters the gradients."""
        gathered = all_gather_single(x.contiguous(), gather_dim=2, group=self.mesh)
        chunks = gathered.split(self.chunk, dim=2)  # in rank order
        return torch.cat([chunks[i] for i in self.gathered_index], dim=2)
