"""Attention as an interface: a model's attention layers call the function the trainer chose for
the run, never ``scaled_dot_product_attention`` directly, so a layout that changes how attention
is computed (context parallel's all-gathered keys, block-causal masks for packed documents,
FlexAttention) reaches every layer explicitly, and no library's attention is patched. Where a
new variant goes: here, as one more ``AttentionFn``, chosen in ``Trainer.attention_fn``.

Packed documents arrive as ``document_ids`` [B, T] of the whole sequence (under context parallel
too, where each rank holds only some of its chunks): a query attends to earlier keys of its own
document only."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from tetrad.distributed.context_parallel import ContextParallel
from tetrad.errors import ConfigError


class AttentionFn(Protocol):
    """Causal attention of queries [B, Hq, T, D] over keys and values [B, Hkv, T, D] (Hq a
    multiple of Hkv: grouped-query attention), within each document of ``document_ids`` [B, T]
    where given; returns [B, Hq, T, D]."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        dropout_p: float = 0.0,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] → [B, Hkv·n_rep, T, D], query head h reading kv head h // n_rep. Repeating
    instead of SDPA's ``enable_gqa`` keeps every SDPA backend and attention bias usable."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def document_causal_mask(
    document_ids: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor
) -> torch.Tensor:
    """The dense block-causal mask [B, 1, Tq, Tk] (True = attend) of queries and keys at the
    given sequence indices: a key no later than the query, in the same document."""
    causal = query_index[:, None] >= key_index[None, :]
    same = document_ids[:, query_index, None] == document_ids[:, None, key_index]
    return (causal & same).unsqueeze(1)


def causal_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the whole sequence on this rank; with ``document_ids``, through a
    dense block-causal mask (O(T²) memory: the path for CPU and short sequences). Fewer queries
    than keys are the last of the sequence (decoding with a ``KVCache``): a lower-right-aligned
    causal mask."""
    n_rep = q.shape[1] // k.shape[1]
    mask: torch.Tensor | CausalBias | None = None
    if document_ids is not None:
        index = torch.arange(q.shape[2], device=q.device)
        mask = document_causal_mask(document_ids, index, index)
    elif q.shape[2] != k.shape[2]:
        mask = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(
        q,
        repeat_kv(k, n_rep),
        repeat_kv(v, n_rep),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        dropout_p=dropout_p,
    )


class FlexDocumentAttention:
    """Block-causal attention through FlexAttention, compiled: the mask is a ``BlockMask`` that
    skips every key block of another document, so packed documents cost what they would alone
    and no dense mask is built. GPU only (FlexAttention has no CPU backward in torch 2.13). The
    block mask is built once per batch: every layer (and activation checkpointing's
    recomputation) gets the same ``document_ids`` tensor, which the cache holds alive."""

    def __init__(self) -> None:
        self._flex = torch.compile(flex_attention, dynamic=False)
        # Compiled: the mask is evaluated block by block, never as a dense [B, T, T] tensor.
        self._create_block_mask = torch.compile(create_block_mask, dynamic=False)
        self._cached: tuple[torch.Tensor, BlockMask] | None = None

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def _block_mask(self, document_ids: torch.Tensor) -> BlockMask:
        if self._cached is None or self._cached[0] is not document_ids:

            def same_document_causal(
                b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
            ) -> torch.Tensor:
                same = document_ids[b, q_idx] == document_ids[b, kv_idx]
                return (q_idx >= kv_idx) & same

            batch, length = document_ids.shape
            mask = self._create_block_mask(
                same_document_causal, batch, None, length, length, device=document_ids.device
            )
            self._cached = (document_ids, mask)
        return self._cached[1]

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        dropout_p: float = 0.0,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if document_ids is None:
            return causal_sdpa(q, k, v, scale=scale, dropout_p=dropout_p)
        if dropout_p:
            raise ConfigError(
                "FlexAttention does not support attention dropout; turn it off in the model "
                "config (HF: --model.hf_overrides attention_dropout=0)"
            )
        out = self._flex(
            q, k, v, block_mask=self._block_mask(document_ids), scale=scale, enable_gqa=True
        )
        assert isinstance(out, torch.Tensor)
        return out


class ContextParallelAttention:
    """Causal attention where each cp rank holds two of the sequence's 2·cp chunks
    (``ContextParallel``): keys and values are all-gathered, and each local query chunk attends
    to the keys up to its own end under a lower-right-aligned causal mask, which keeps SDPA's
    flash and memory-efficient kernels usable (no dense mask is built). Packed documents take
    a dense block-causal mask per chunk, from the whole sequence's ``document_ids``, built once
    per batch and shared by every layer (the cache holds the ids alive, as FlexAttention's)."""

    def __init__(self, context_parallel: ContextParallel) -> None:
        self.cp = context_parallel
        self._cached: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def _masks(self, document_ids: torch.Tensor) -> list[torch.Tensor]:
        """The block-causal mask of each local query chunk against the keys up to its end."""
        if self._cached is None or self._cached[0] is not document_ids:
            chunk, device = self.cp.chunk, document_ids.device
            masks = [
                document_causal_mask(
                    document_ids,
                    torch.arange(index * chunk, (index + 1) * chunk, device=device),
                    torch.arange((index + 1) * chunk, device=device),
                )
                for index in self.cp.local_chunks
            ]
            self._cached = (document_ids, masks)
        return self._cached[1]

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
        document_ids: torch.Tensor | None = None,
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
        masks = None if document_ids is None else self._masks(document_ids)
        for local, index in enumerate(self.cp.local_chunks):
            end = (index + 1) * chunk
            mask: torch.Tensor | CausalBias = (
                causal_lower_right(chunk, end) if masks is None else masks[local]
            )
            outputs.append(
                F.scaled_dot_product_attention(
                    q[:, :, local * chunk : (local + 1) * chunk],
                    keys[:, :, :end],
                    values[:, :, :end],
                    attn_mask=mask,
                    scale=scale,
                )
            )
        return torch.cat(outputs, dim=2)
