"""Llama 3 presets: a tiny ``debug`` model and the published Llama 3.1 / 3.2 shapes.

Shapes follow Meta's released params.json files (hidden widths 8192, 8192, 14336, 28672, 53248).
"""

from __future__ import annotations

from tetrad.models.llama3.model import Llama3Config, RopeScaling

_VOCAB = 128256
_CONTEXT = 131072
_LLAMA_3_1_SCALING = RopeScaling(factor=8.0)
_LLAMA_3_2_SCALING = RopeScaling(factor=32.0)

llama3_presets: dict[str, Llama3Config] = {
    # For tests of every parallelism on a 2-core CPU: grouped-query attention with 2 kv heads
    # still splits across 2 tensor-parallel ranks.
    "tiny": Llama3Config(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=0, multiple_of=32, max_seq_len=512
    ),
    # tiny with 4 blocks, for pipeline tests with 2 stages per rank on 2 ranks.
    "tiny_pp": Llama3Config(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=0, multiple_of=32, max_seq_len=512
    ),
    "debug": Llama3Config(dim=256, n_layers=6, n_heads=16, vocab_size=0, max_seq_len=2048),
    "1B": Llama3Config(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=_VOCAB,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        rope_scaling=_LLAMA_3_2_SCALING,
        max_seq_len=_CONTEXT,
        tie_embeddings=True,
    ),
    "3B": Llama3Config(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        vocab_size=_VOCAB,
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        rope_scaling=_LLAMA_3_2_SCALING,
        max_seq_len=_CONTEXT,
        tie_embeddings=True,
    ),
    "8B": Llama3Config(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=_VOCAB,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_scaling=_LLAMA_3_1_SCALING,
        max_seq_len=_CONTEXT,
    ),
    "70B": Llama3Config(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=_VOCAB,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_scaling=_LLAMA_3_1_SCALING,
        max_seq_len=_CONTEXT,
    ),
    "405B": Llama3Config(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        vocab_size=_VOCAB,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
        rope_scaling=_LLAMA_3_1_SCALING,
        max_seq_len=_CONTEXT,
    ),
}
