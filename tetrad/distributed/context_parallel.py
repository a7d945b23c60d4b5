"""Context parallel: every cp rank holds 1/cp of each sequence and attends over all of it.

Each sequence is cut into 2·cp chunks and rank r keeps chunks r and 2·cp − 1 − r: under a causal
mask an early chunk attends to few keys and its mirror to many, so every rank does the same
work. Attention all-gathers K and V over the cp mesh with autograd-aware functional collectives
(their backward reduce-scatters the K/V gradients) and runs each local query chunk against the
keys up to the chunk's end with a lower-right-aligned causal mask. This is the design of the
Llama 3 paper; it trains on CPU and GPU alike, where PyTorch's ring-attention
``context_parallel`` is CUDA-only, and the lower-right causal bias keeps SDPA's flash and
memory-efficient kernels usable on GPU (no dense mask is built).

The model stays single-device code: a ``TorchFunctionMode`` swaps this attention in for its
causal ``scaled_dot_product_attention`` calls, and the trainer passes each token's position
to the rotary embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_single
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention.bias import causal_lower_right
from torch.overrides import TorchFunctionMode

from tetrad.config import ConfigError


def chunk_order(cp: int) -> list[int]:
    """Sequence chunks in the order the ranks hold them: rank r's two chunks at 2r and 2r+1."""
    return [chunk for rank in range(cp) for chunk in (rank, 2 * cp - 1 - rank)]


class ContextParallel:
    """Shards batches along the sequence and provides the matching attention."""

    def __init__(self, cp_mesh: DeviceMesh, seq_len: int) -> None:
        cp = cp_mesh.size()
        if seq_len % (2 * cp):
            raise ConfigError(
                f"--training.seq_len {seq_len} is not divisible by 2 × cp = {2 * cp}: context "
                "parallel cuts every sequence into 2·cp equal chunks"
            )
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

    def attention(self) -> TorchFunctionMode:
        """Context manager under which the model's causal SDPA attends across the cp ranks;
        active for forward and backward alike, so activation-checkpointing recomputation
        gathers K/V too."""
        return _AllGatherKVAttention(self)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None,
        enable_gqa: bool,
    ) -> torch.Tensor:
        """Causal attention of the local queries over the whole sequence; [B, H, T/cp, D]."""
        # All ranks' K/V chunks in rank order, then reordered into sequence order.
        gathered = [
            all_gather_single(x.contiguous(), gather_dim=2, group=self.mesh).split(
                self.chunk, dim=2
            )
            for x in (k, v)
        ]
        keys, values = (
            torch.cat([chunks[i] for i in self.gathered_index], dim=2) for chunks in gathered
        )
        outputs = []
        for local, chunk in enumerate(self.local_chunks):
            end = (chunk + 1) * self.chunk
            outputs.append(
                F.scaled_dot_product_attention(
                    q[:, :, local * self.chunk : (local + 1) * self.chunk],
                    keys[:, :, :end],
                    values[:, :, :end],
                    attn_mask=causal_lower_right(self.chunk, end),
                    scale=scale,
                    enable_gqa=enable_gqa,
                )
            )
        return torch.cat(outputs, dim=2)


class _AllGatherKVAttention(TorchFunctionMode):
    def __init__(self, context_parallel: ContextParallel) -> None:
        super().__init__()
        self.context_parallel = context_parallel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, *rest = args
        options = dict(
            zip(("attn_mask", "dropout_p", "is_causal", "scale"), rest, strict=False), **kwargs
        )
        if options.get("attn_mask") is not None or not options.get("is_causal", False):
            raise NotImplementedError("context parallel supports causal attention without a mask")
        if options.get("dropout_p", 0.0):
            raise NotImplementedError("context parallel does not support attention dropout")
        return self.context_parallel.attend(
            q, k, v, options.get("scale"), options.get("enable_gqa", False)
        )
