"""Context parallel: every cp rank holds 1/cp of each sequence and attends over all of it.

Each sequence is cut into 2·cp chunks and rank r keeps chunks r and 2·cp − 1 − r: under a causal
mask an early chunk attends to few keys and its mirror to many, so every rank does the same
work. Attention all-gathers K and V over the cp mesh with autograd-aware functional collectives
(their backward reduce-scatters the K/V gradients) and runs each local query chunk against the
keys up to the chunk's end with a lower-right-aligned causal mask. This is the design of the
Llama 3 paper; it trains on CPU and GPU alike, where PyTorch's ring-attention
``context_parallel`` is CUDA-only, and the lower-right causal bias keeps SDPA's flash and
memory-efficient kernels usable on GPU (no dense mask is built).

The model stays single-device code: while ``attention()`` is active, this attention stands in
for ``torch.nn.functional.scaled_dot_product_attention`` (process-wide; the trainer runs one
step at a time), and the trainer passes each token's position to the rotary embedding. A
``TorchFunctionMode`` would be scoped more tightly, but activation checkpointing recomputes
blocks inside the autograd engine, where a mode entered around ``backward()`` is not active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_single
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention.bias import causal_lower_right

from tetrad.config import ConfigError

_sdpa = F.scaled_dot_product_attention


def chunk_order(cp: int) -> list[int]:
    """Sequence chunks in the order the ranks hold them: rank r's two chunks at 2r and 2r+1."""
    return [chunk for rank in range(cp) for chunk in (rank, 2 * cp - 1 - rank)]


class ContextParallel:
    """Shards batches along the sequence and provides the matching attention."""

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
        self._attention = self._sdpa  # one bound method: compiled code guards on its identity

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, seq_len] → this rank's [B, seq_len // cp] (its two chunks, concatenated)."""
        return batch[:, self.positions.to(batch.device)]

    @contextlib.contextmanager
    def attention(self) -> Iterator[None]:
        """Within it, the model's causal SDPA attends across the cp ranks. Keep it open over
        backward too: activation checkpointing's recomputation must gather K/V as well."""
        with _sdpa_as(self._attention):
            yield

    @torch.compiler.disable  # eager between compiled parts: collectives and the causal bias
    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or not is_causal:
            raise ConfigError(
                "context parallel needs causal attention without a mask (packed sequences); "
                "this model passes a mask: train it with --parallelism.cp=1"
            )
        if dropout_p:
            raise ConfigError(
                "context parallel does not support attention dropout; turn it off in the "
                "model config or use --parallelism.cp=1"
            )
        return self.attend(q, k, v, scale, enable_gqa)

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
        # The stock SDPA, back in place while it runs: the causal bias object dispatches only
        # when the function called is torch's own.
        with _sdpa_as(_sdpa):
            for local, chunk in enumerate(self.local_chunks):
                end = (chunk + 1) * self.chunk
                outputs.append(
                    _sdpa(
                        q[:, :, local * self.chunk : (local + 1) * self.chunk],
                        keys[:, :, :end],
                        values[:, :, :end],
                        attn_mask=causal_lower_right(self.chunk, end),
                        scale=scale,
                        enable_gqa=enable_gqa,
                    )
                )
        return torch.cat(outputs, dim=2)


@contextlib.contextmanager
def _sdpa_as(function: Callable[..., torch.Tensor]) -> Iterator[None]:
    """``torch.nn.functional.scaled_dot_product_attention`` is ``function`` within."""
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = function
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous
