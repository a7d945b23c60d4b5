"""Attention as an interface: a model's attention layers call the function the trainer chose for
the run, never ``scaled_dot_product_attention`` directly, so a layout that changes how attention
is computed (context parallel's all-gathered keys, and later block-causal masks for packed
documents or FlexAttention) reaches every layer explicitly, and no library's attention is
patched. Where a new variant goes: here, as one more ``AttentionFn``, chosen in
``Trainer.attention_fn``."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from tetrad.distributed.context_parallel import ContextParallel
from tetrad.errors import ConfigError


class AttentionFn(Protocol):
    """Causal attention of queries [B, Hq, T, D] over keys and values [B, Hkv, T, D] (Hq a
    multiple of Hkv: grouped-query attention); returns [B, Hq, T, D]."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor: ...


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] → [B, Hkv·n_rep, T, D], query head h reading kv head h // n_rep. Repeating
    instead of SDPA's ``enable_gqa`` keeps every SDPA backend and attention bias usable."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Plain causal attention: the whole sequence is on this rank."""
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q,
        repeat_kv(k, n_rep),
        repeat_kv(v, n_rep),
        is_causal=True,
        scale=scale,
        dropout_p=dropout_p,
    )


class ContextParallelAttention:
    """Causal attention where each cp rank holds two of the sequence's 2·cp chunks
    (``ContextParallel``): keys and values are all-gathered, and each local query chunk attends
    to the keys up to its own end under a lower-right-aligned causal mask, which keeps SDPA's
    flash and memory-efficient kernels usable (no dense mask is built)."""

    def __init__(self, context_parallel: ContextParallel) -> None:
        self.cp = context_parallel

    # Eager between compiled parts: collectives and the causal bias. (torch leaves the
    # decorator unannotated.)
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> torch.Tensor:
        if dropout_p:
            raise ConfigError(
                "context parallel does not support attention dropout; turn it off in the "
                "model config or use --parallelism.cp=1"
            )
        n_rep = q.shape[1] // k.shape[1]
        keys = repeat_kv(self.cp.gather_sequence(k), n_rep)
        values = repeat_kv(self.cp.gather_sequence(v), n_rep)
        chunk, outputs = self.cp.chunk, []
        for local, index in enumerate(self.cp.local_chunks):
            end = (index + 1) * chunk
            outputs.append(
                F.scaled_dot_product_attention(
                    q[:, :, local * chunk : (local + 1) * chunk],
                    keys[:, :, :end],
                    values[:, :, :end],
                    attn_mask=causal_lower_right(chunk, end),
                    scale=scale,
                )
            )
        return torch.cat(outputs, dim=2)
