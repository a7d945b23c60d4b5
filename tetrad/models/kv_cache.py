"""A key/value cache for incremental decoding, as an ``AttentionFn``: the model's own attention
layers (projections, rotary embeddings at the ``positions`` the caller passes, output
projection) run unchanged, and only the attention over keys and values reads the cached ones of
earlier tokens. Any family that routes attention through ``set_attention`` decodes with it.

One object serves every layer: a forward calls each layer's attention once, in block order, so
the n-th call of a forward is layer n. Under tensor parallel each rank caches its own heads.
"""

from __future__ import annotations

import torch

from tetrad.models.attention import causal_sdpa


class KVCache:
    """Keys and values [B, Hkv, max_len, D] per layer, filled as tokens are decoded."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.n_layers, self.max_len = n_layers, max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0
        """Tokens cached (of every layer once a forward is complete)."""
        self._layer = 0

    def __repr__(self) -> str:  # names it in errors (HF models that run their own attention)
        return "tetrad's KV cache"

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
        """Append this forward's keys and values [B, Hkv, T, D] of the current layer; its
        queries [B, Hq, T, D] (the sequence's last T) attend causally over all cached ones."""
        if document_ids is not None or dropout_p:
            raise ValueError("decoding with a KV cache takes one document and no dropout")
        layer, start, end = self._layer, self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"{end} tokens exceed the cache's {self.max_len}")
        if layer == len(self.keys):  # first forward: allocate on the keys' device and dtype
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys.append(k.new_empty(shape))
            self.values.append(v.new_empty(shape))
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self._layer = (layer + 1) % self.n_layers
        if self._layer == 0:
            self.length = end
        keys, values = self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        return causal_sdpa(q, keys, values, scale=scale)
