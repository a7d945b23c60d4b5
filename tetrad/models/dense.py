"""What every Llama-like dense decoder shares, written once: its parameter count and training
FLOPs from the config alone (a 405B config needs no build). A family maps its config onto
``DenseDecoderShape``; the extras carry what its variant adds (biases, per-head norms)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DenseDecoderShape:
    dim: int
    n_layers: int
    n_heads: int
    kv_heads: int
    head_dim: int
    hidden_dim: int
    """Width of the gated MLP (gate, up and down projections)."""
    vocab_size: int
    tie_embeddings: bool
    attention_extra: int = 0
    """Parameters per attention layer beyond the q/k/v/o matrices (biases, q/k norms)."""
    mlp_extra: int = 0
    """Parameters per MLP beyond its three matrices (biases)."""

    def count_params(self, names: tuple[str, str, str, str]) -> dict[str, int]:
        """Parameters by top-level module, under the family's ``names`` for (embedding, blocks,
        final norm, output), plus "total". A tied output counts 0: its matrix is the
        embedding's."""
        q_dim, kv_dim = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        attention = 2 * self.dim * q_dim + 2 * self.dim * kv_dim + self.attention_extra
        mlp = 3 * self.dim * self.hidden_dim + self.mlp_extra
        embedding, blocks, norm, output = names
        counts = {
            embedding: self.vocab_size * self.dim,
            blocks: self.n_layers * (attention + mlp + 2 * self.dim),  # + two norms per block
            norm: self.dim,
            output: 0 if self.tie_embeddings else self.vocab_size * self.dim,
        }
        counts["total"] = sum(counts.values())
        return counts

    def non_embedding_params(self) -> int:
        """Blocks, final norm and the output projection (counted tied or not: it is a matmul)."""
        counts = self.count_params(("embedding", "blocks", "norm", "output"))
        return counts["blocks"] + counts["norm"] + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: ``training_flops_per_token`` over this shape."""
        return training_flops_per_token(
            self.non_embedding_params(), self.n_layers, self.n_heads * self.head_dim, seq_len
        )


def training_flops_per_token(
    non_embedding_params: int, n_layers: int, attention_dim: int, seq_len: int
) -> int:
    """6·N for the forward and backward matmuls over the N non-embedding parameters (the output
    projection counts, tied or not), plus 6·2·n_layers·attention_dim·seq_len for QKᵀ and
    attention·V (Kaplan et al. 2020, no discount for the causal mask)."""
    return 6 * non_embedding_params + 12 * n_layers * attention_dim * seq_len
