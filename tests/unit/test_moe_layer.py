"""The MoE layer against a per-token loop written from the definitions, its two expert backends
against each other, the balance loss against a per-sequence count, and the auxiliary-loss-free
bias on a skewed router."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tetrad.models.moe.layer import MoE, Router, sequence_balance_loss

DIM, HIDDEN, EXPERTS, TOP_K = 16, 24, 6, 2


def make_moe(
    backend: str,
    *,
    score_func: str = "softmax",
    shared: int = 0,
    route_scale: float = 1.0,
    groups: tuple[int, int] = (1, 1),
) -> MoE:
    torch.manual_seed(0)
    moe = MoE(
        DIM,
        num_experts=EXPERTS,
        top_k=TOP_K,
        hidden_dim=HIDDEN,
        num_shared_experts=shared,
        score_func=score_func,  # type: ignore[arg-type]
        norm_topk_prob=True,
        route_scale=route_scale,
        backend=backend,  # type: ignore[arg-type]
        n_groups=groups[0],
        topk_groups=groups[1],
    )
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, EXPERTS))  # steers the choice
    return moe


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token on its own: scores, its best groups (by the sum of their two best biased
    scores), top k of score + bias in them, weights from the scores alone, renormalised and
    scaled, then a weighted sum of its experts' SwiGLU outputs."""
    r, e = moe.router, moe.experts
    size = EXPERTS // r.n_groups
    out = []
    for token in x.reshape(-1, DIM):
        logits = r.gate.weight @ token
        scores = logits.softmax(-1) if r.score_func == "softmax" else logits.sigmoid()
        biased = (scores.detach() + r.expert_bias).tolist()
        best = [sum(sorted(biased[g * size : (g + 1) * size])[-2:]) for g in range(r.n_groups)]
        kept = sorted(range(r.n_groups), key=lambda g: -best[g])[: r.topk_groups]
        allowed = [i for i in range(EXPERTS) if i // size in kept]
        chosen = torch.tensor(sorted(allowed, key=lambda i: -biased[i])[:TOP_K])
        weights = scores[chosen] / scores[chosen].sum() * r.route_scale
        y = sum(
            w * (e.w2[i] @ (F.silu(e.w1[i] @ token) * (e.w3[i] @ token)))
            for w, i in zip(weights, chosen.tolist(), strict=True)
        )
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(token)
        out.append(y)
    return torch.stack(out).view_as(x)


def outputs_and_grads(moe: MoE, x: torch.Tensor, forward) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    x = x.clone().requires_grad_()
    moe.zero_grad()
    y = forward(moe, x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), x.grad, *(p.grad.clone() for p in moe.parameters())]  # type: ignore[list-item,union-attr]


CASES = {
    "softmax": {},
    "sigmoid_shared_scaled": {"score_func": "sigmoid", "shared": 1, "route_scale": 2.5},
    "sigmoid_groups": {"score_func": "sigmoid", "groups": (3, 1)},  # both experts in 1 group
}


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_equals_per_token_loop(backend: str, case: str) -> None:
    moe = make_moe(backend, **CASES[case])  # type: ignore[arg-type]
    x = torch.randn(3, 10, DIM, generator=torch.Generator().manual_seed(1))
    got = outputs_and_grads(moe, x, lambda m, t: m(t))
    want = outputs_and_grads(moe, x, per_token_reference)
    assert len(got) == len(want) == 2 + len(list(moe.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    if case == "sigmoid_groups":
        _, chosen, _ = moe.router(x.reshape(-1, DIM))
        assert (chosen[:, 0] // 2 == chosen[:, 1] // 2).all()  # 3 groups of 2 experts, keep 1


def test_grouped_mm_equals_loop_with_an_idle_expert() -> None:
    """Same weights through both backends; one expert gets no token (an empty group)."""
    loop, grouped = make_moe("loop"), make_moe("grouped_mm")
    for moe in (loop, grouped):
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, -10]))  # expert 5 idle
    x = torch.randn(2, 12, DIM, generator=torch.Generator().manual_seed(2))
    got = outputs_and_grads(grouped, x, lambda m, t: m(t))
    want = outputs_and_grads(loop, x, lambda m, t: m(t))
    assert grouped.tokens_per_expert[5] == 0 and grouped.tokens_per_expert.sum() == 24 * TOP_K
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_bias_steers_the_choice_not_the_weights() -> None:
    torch.manual_seed(3)
    router = Router(DIM, EXPERTS, TOP_K, score_func="sigmoid", norm_topk_prob=False, route_scale=1)
    x = torch.randn(20, DIM)
    router.expert_bias.fill_(0).index_fill_(0, torch.tensor([4]), 5.0)
    scores, chosen, weights = router(x)
    assert (chosen == 4).any(-1).all()  # every token picks the favoured expert
    torch.testing.assert_close(weights, scores.gather(-1, chosen))  # no bias in the weights
    assert "expert_bias" in router.state_dict() and not router.expert_bias.requires_grad


def test_sequence_balance_loss_counts_per_sequence() -> None:
    """Against a direct count per sequence; 1 exactly for uniform scores and an even split."""
    g = torch.Generator().manual_seed(4)
    batch, seq = 3, 8
    scores = torch.rand(batch * seq, EXPERTS, generator=g).softmax(-1)
    chosen = torch.topk(scores, TOP_K).indices
    want = 0.0
    for b in range(batch):
        rows = slice(b * seq, (b + 1) * seq)
        for i in range(EXPERTS):
            f = (chosen[rows] == i).sum().item() * EXPERTS / (TOP_K * seq)
            want += f * scores[rows, i].mean().item()
    got = sequence_balance_loss(scores, chosen, batch=batch, score_func="softmax")
    assert abs(got.item() - want) < 1e-5
    uniform = torch.full((seq, EXPERTS), 1 / EXPERTS)
    spread = torch.arange(seq * TOP_K).view(seq, TOP_K) % EXPERTS
    one = sequence_balance_loss(uniform, spread, batch=1, score_func="softmax")
    # 8 tokens × 2 choices over 6 experts cannot split evenly: f·P still averages to 1.
    assert abs(one.item() - 1.0) < 1e-6


def test_loss_free_bias_balances_a_skewed_router() -> None:
    """A router whose gate favours two experts; 300 updates of the bias from the observed loads
    (rate 0.002) bring tokens per expert from some idle experts (max/min ≥ 10, an idle expert
    counted as 1 token) to max/min ≤ 1.5."""
    torch.manual_seed(5)
    router = Router(DIM, EXPERTS, TOP_K, score_func="sigmoid", norm_topk_prob=True, route_scale=1)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.3)
        router.gate.weight[:2] += 0.4  # experts 0 and 1: high scores for most tokens
    x = torch.randn(512, DIM).abs()

    def loads() -> torch.Tensor:
        return torch.bincount(router(x)[1].reshape(-1), minlength=EXPERTS).float()

    before = loads()
    for _ in range(300):
        router.update_bias(loads(), rate=0.002)
    after = loads()
    ratio_before = (before.max() / before.min().clamp(min=1)).item()
    ratio_after = (after.max() / after.min()).item()
    print(f"tokens per expert before {before.tolist()}, after {after.tolist()}: max/min "
          f"{ratio_before:.0f} → {ratio_after:.2f}")  # fmt: skip
    assert ratio_before >= 10 and ratio_after <= 1.5
