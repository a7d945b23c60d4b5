"""A tiny Qwen3-MoE made with ``transformers`` (random weights, saved by ``save_pretrained`` in
the hub's per-expert format) loads into tetrad's model through the adapter with the same
logits, and the adapter writes back the very tensors it read."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from tetrad.models.moe import MoETransformer
from tetrad.models.moe.state_dict_adapter import Qwen3MoeStateDictAdapter, qwen3_moe_config


def test_tiny_transformers_qwen3_moe_gives_the_same_logits(tmp_path: Path) -> None:
    hf_config = Qwen3MoeConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, mlp_only_layers=[0], num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=64, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = Qwen3MoeForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(std=0.2)  # norms and router away from their 1s and 0s
    hf_model.save_pretrained(tmp_path)
    config = qwen3_moe_config(json.loads((tmp_path / "config.json").read_text()))
    assert (config.n_dense_layers, config.norm_topk_prob) == (1, True)
    adapter = Qwen3MoeStateDictAdapter(config)
    model = MoETransformer(config)
    model.init_buffers()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
    used: set[str] = set()
    with torch.no_grad():
        for fqn, tensor in model.state_dict().items():
            keys = adapter.hf_keys(fqn)
            used.update(keys)
            if keys:
                tensor.copy_(adapter.from_hf(fqn, [stored[k] for k in keys]))
                back = adapter.to_hf(fqn, tensor)
                assert all(torch.equal(b, stored[k]) for b, k in zip(back, keys, strict=True))
    assert used == set(stored)  # every checkpoint tensor has its place, and only one
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
