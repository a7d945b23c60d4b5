"""MoE families: the published Qwen3-MoE shapes build on meta with the model cards' parameter
counts (total and active), FLOPs per token count active parameters, and a tiny model reports
what the trainer reads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tetrad.models.dense import training_flops_per_token
from tetrad.models.materialize import init_weights
from tetrad.models.moe import MoE, MoETransformer, count_params
from tetrad.models.moe.layer import GroupedExperts
from tetrad.models.moe.model import num_flops_per_token
from tetrad.models.moe.presets import deepseek_moe_presets, qwen3_moe_presets
from tetrad.models.registry import get_model_spec

# Model cards (huggingface.co/Qwen/Qwen3-30B-A3B, .../Qwen3-235B-A22B): total and activated
# parameters as printed, each with the unit of its last digit.
PUBLISHED = {
    "30B-A3B": ((30.5e9, 0.1e9), (3.3e9, 0.1e9)),
    "235B-A22B": ((235e9, 1e9), (22e9, 1e9)),
}


def built_counts(model: MoETransformer) -> tuple[int, float]:
    """Total parameters of a built model, and those one token uses: every tensor but the routed
    experts, of which each MoE layer's token uses top_k of num_experts."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts)
                 for p in m.parameters())  # fmt: skip
    return total, total - routed + routed * c.top_k / c.num_experts


@pytest.mark.parametrize("flavor", list(PUBLISHED))
def test_published_qwen3_shapes_have_the_model_cards_counts(flavor: str) -> None:
    config = qwen3_moe_presets[flavor]
    with torch.device("meta"):
        model = MoETransformer(config)
    total, active = built_counts(model)
    counts = count_params(config)
    assert counts == {"total": total, "active": active}
    # The cards truncate: 30.53B → "30.5B", 3.35B → "3.3B", 235.09B → "235B", 22.19B → "22B".
    for got, (printed, digit) in zip((total, active), PUBLISHED[flavor], strict=True):
        assert printed <= got < printed + digit, (flavor, got)


def test_flops_per_token_count_active_parameters() -> None:
    """6 × active non-embedding parameters (+ attention): a MoE's MFU is not inflated by the
    experts a token skips. Qwen3-30B-A3B: ~3.0B active non-embedding of 30.2B."""
    config = qwen3_moe_presets["30B-A3B"]
    with torch.device("meta"):
        model = MoETransformer(config)
    _, active = built_counts(model)
    embedding = config.vocab_size * config.dim
    want = training_flops_per_token(int(active) - embedding, 48, 32 * 128, 4096)
    assert num_flops_per_token(config, 4096) == want
    assert 6 * 2.9e9 < want - 12 * 48 * 32 * 128 * 4096 < 6 * 3.1e9


def test_tiny_models_report_aux_loss_and_loads() -> None:
    for name, presets in (("qwen3_moe", qwen3_moe_presets), ("deepseek_moe", deepseek_moe_presets)):
        config = dataclasses.replace(presets["tiny"], vocab_size=97)
        assert get_model_spec(name).presets["tiny"] is presets["tiny"]
        model = MoETransformer(config)
        init_weights(model, seed=0)
        model.init_buffers()
        tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
        logits = model(tokens)
        assert logits.shape == (3, 16, 97) and torch.isfinite(logits).all()
        n_moe = config.n_layers - config.n_dense_layers
        assert len(model.moe_layers()) == n_moe
        assert isinstance(model.layers["0"].feed_forward, MoE) != (config.n_dense_layers > 0)
        loads = model.expert_loads()
        assert loads is not None and loads.shape == (n_moe, config.num_experts)
        assert (loads.sum(-1) == 3 * 16 * config.top_k).all()
        aux = model.auxiliary_loss()
        per_layer = torch.stack([m.balance_loss for m in model.moe_layers()])
        assert aux is not None and aux.requires_grad
        torch.testing.assert_close(aux, config.aux_loss_coef * per_layer.mean())
        # The loss-free update: below-mean experts move up by the rate, above-mean down.
        model.update_after_step(loads)
        bias = torch.stack([m.router.expert_bias for m in model.moe_layers()])
        want = config.bias_update_rate * torch.sign(loads.mean(-1, keepdim=True) - loads)
        torch.testing.assert_close(bias, want)
