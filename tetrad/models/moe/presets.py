"""MoE presets: Qwen3-MoE (``tiny``/``debug`` for tests, the published 30B-A3B and 235B-A22B
shapes) and a DeepSeek-V3-style family at test sizes.

Qwen3 shapes are the values of the ``config.json`` files of the Hugging Face repositories
Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B (hidden_size, intermediate_size,
moe_intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
num_experts, num_experts_per_tok, norm_topk_prob true, rope_theta 1e6, rms_norm_eps 1e-6,
router_aux_loss_coef 0.001, vocab_size 151936, max_position_embeddings 40960, untied), as also
used in Megatron-style launch scripts for them. Their model cards state 30.5B total / 3.3B
activated and 235B / 22B; ``tests/unit/test_moe_model.py`` checks the counts against those.

The DeepSeek-V3-style presets keep its MoE design (dense first layers, one shared expert,
sigmoid router with normalised top-k weights, group-limited routing, the auxiliary-loss-free
bias at rate 0.001 and a small sequence-wise loss, α = 0.0001) with standard grouped-query attention: multi-head
latent attention is not implemented, so the published 16B/671B shapes are not offered.
"""

from __future__ import annotations

import functools

from tetrad.models.moe.model import MoEConfig

_QWEN3_VOCAB = 151936
_qwen3 = functools.partial(
    MoEConfig, qk_norm=True, score_func="softmax", norm_topk_prob=True, aux_loss_coef=0.001
)

qwen3_moe_presets: dict[str, MoEConfig] = {
    # For tests on a 2-core CPU; both balancers on, so a tiny run exercises both.
    "tiny": _qwen3(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=0, hidden_dim=128,
        num_experts=8, top_k=2, moe_hidden_dim=32, max_seq_len=512, bias_update_rate=0.001,
    ),
    "debug": _qwen3(
        dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, vocab_size=0, hidden_dim=768,
        num_experts=16, top_k=4, moe_hidden_dim=128, max_seq_len=2048, bias_update_rate=0.001,
    ),
    "30B-A3B": _qwen3(
        dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, vocab_size=_QWEN3_VOCAB,
        hidden_dim=6144, num_experts=128, top_k=8, moe_hidden_dim=768, max_seq_len=40960,
    ),
    "235B-A22B": _qwen3(
        dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, head_dim=128, vocab_size=_QWEN3_VOCAB,
        hidden_dim=12288, num_experts=128, top_k=8, moe_hidden_dim=1536, max_seq_len=40960,
    ),
}  # fmt: skip

_deepseek_v3_style = functools.partial(
    MoEConfig,
    score_func="sigmoid",
    norm_topk_prob=True,
    num_shared_experts=1,
    aux_loss_coef=0.0001,
    bias_update_rate=0.001,
    rope_theta=10000.0,
)

deepseek_moe_presets: dict[str, MoEConfig] = {
    "tiny": _deepseek_v3_style(
        dim=64, n_layers=3, n_dense_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
        vocab_size=0, hidden_dim=128, num_experts=8, top_k=2, moe_hidden_dim=32,
        max_seq_len=512, n_expert_groups=4, topk_groups=2,
    ),
    # tiny with 4 blocks, 2 of them dense, for pipeline tests: a stage without MoE layers.
    "tiny_pp": _deepseek_v3_style(
        dim=64, n_layers=4, n_dense_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
        vocab_size=0, hidden_dim=128, num_experts=8, top_k=2, moe_hidden_dim=32,
        max_seq_len=512, n_expert_groups=4, topk_groups=2, aux_loss_coef=0.01,
    ),
    "debug": _deepseek_v3_style(
        dim=256, n_layers=6, n_dense_layers=1, n_heads=8, n_kv_heads=4, head_dim=32,
        vocab_size=0, hidden_dim=768, num_experts=16, top_k=4, moe_hidden_dim=128,
        max_seq_len=2048, n_expert_groups=4, topk_groups=2,
    ),
}  # fmt: skip
