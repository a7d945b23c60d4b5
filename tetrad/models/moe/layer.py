"""A mixture-of-experts feed-forward layer: a top-k token-choice router, routed SwiGLU experts
computed dropless, optional shared experts, and both ways of balancing the experts' loads.

Single-device PyTorch. The routed experts' weights are stacked ``[num_experts, ...]`` so that
expert parallel can shard dim 0 and FSDP the rest; each expert's slice is laid out as an
``nn.Linear`` weight ``[out, in]``, as Hugging Face checkpoints store it.

Balancing (both optional, both may be on):
- an auxiliary loss per sequence (DeepSeek-V3's "complementary sequence-wise" loss, the Switch
  Transformer's f·P per sequence): a sum over sequences, so the trainer's mean over the global
  batch's sequences does not depend on micro-batching or data-parallel layout;
- DeepSeek-V3's auxiliary-loss-free bias (Wang et al. 2024): a per-expert buffer added to the
  scores for the top-k choice only (never to the gate weights, never in the gradient), moved
  after each optimizer step by ``rate · sign(mean load − load)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from tetrad.models.llama3.model import FeedForward

ScoreFunc = Literal["softmax", "sigmoid"]
ExpertsBackend = Literal["auto", "grouped_mm", "loop"]


class Router(nn.Module):
    """Top-k token choice. Scores are softmax or sigmoid of ``gate(x)`` in float32; the top k
    of scores + ``expert_bias`` are chosen; the gate weights are the chosen scores, optionally
    renormalised to sum to one, times ``route_scale``.

    Group-limited routing (DeepSeek-V3's node-limited routing, with groups standing for the
    nodes their experts live on): experts form ``n_groups`` equal groups, each token keeps the
    ``topk_groups`` groups whose two best biased scores sum highest, and picks its k experts
    among those, so a token's experts span at most ``topk_groups`` groups."""

    expert_bias: torch.Tensor

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: ScoreFunc,
        norm_topk_prob: bool,
        route_scale: float,
        n_groups: int = 1,
        topk_groups: int = 1,
    ) -> None:
        super().__init__()
        if num_experts % n_groups or not 0 < topk_groups <= n_groups:
            raise ValueError(
                f"{num_experts} experts do not split into {n_groups} groups, keep {topk_groups}"
            )
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.top_k, self.score_func = top_k, score_func
        self.norm_topk_prob, self.route_scale = norm_topk_prob, route_scale
        # Persistent: a resumed run continues with the bias it had (init_buffers zeroes it).
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, dim] → (scores [N, E] float32, chosen experts [N, k], gate weights [N, k])."""
        logits = self.gate(x).float()
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        # The bias steers the choice only: it is in no gradient and no gate weight.
        chosen = torch.topk(
            self._limit_groups(scores.detach() + self.expert_bias), self.top_k
        ).indices
        weights = scores.gather(-1, chosen)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return scores, chosen, (weights * self.route_scale).type_as(x)

    def _limit_groups(self, biased: torch.Tensor) -> torch.Tensor:
        """biased scores [N, E] with the experts of each token's unkept groups at -inf."""
        if self.n_groups == 1:
            return biased
        grouped = biased.view(biased.shape[0], self.n_groups, -1)  # [N, G, E / G]
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
        kept = group_scores.topk(self.topk_groups, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(-1, kept, False)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Move each expert's bias toward balance: up for an expert below the mean load, down
        above it, by ``rate`` (DeepSeek-V3's γ). ``load``: tokens per expert [E]."""
        self.expert_bias += rate * torch.sign(load.mean() - load).to(self.expert_bias)


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU MLPs, weights stacked [E, out, in]: w1 gate, w3 up, w2 down."""

    def __init__(
        self, dim: int, hidden_dim: int, num_experts: int, backend: ExpertsBackend
    ) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.backend = backend

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, dim]: rows sorted by expert, ``counts`` [E] rows per expert → [M, dim]."""
        # Expert parallel hands this rank's experts as a DTensor shard: compute on them.
        w1, w2, w3 = (
            w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w2, self.w3)
        )
        if self._use_grouped_mm(x):
            offsets = counts.cumsum(0).to(torch.int32)
            h = F.silu(_grouped_mm(x, w1, offsets)) * _grouped_mm(x, w3, offsets)
            return _grouped_mm(h, w2, offsets)
        outputs = []
        # unbind, not w[e]: its backward stacks the E gradients once, where E selects would
        # each add a zero-filled [E, out, in] gradient (measured: ~40% of a layer's CPU time).
        weights = zip(w1.unbind(0), w2.unbind(0), w3.unbind(0), strict=True)
        for rows, (gate, down, up) in zip(x.split(counts.tolist()), weights, strict=True):
            outputs.append((F.silu(rows @ gate.T) * (rows @ up.T)) @ down.T)  # host sync: counts
        return torch.cat(outputs)

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        """``auto``: the grouped GEMM where torch has it for this dtype (bf16 on CUDA; its meta
        kernel, which torch.compile traces, admits bf16 only), else the loop over experts."""
        if self.backend != "auto":
            return self.backend == "grouped_mm"
        return hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 and x.is_cuda


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row group g of x [M, in] times weight[g]ᵀ ([E, out, in]) → [M, out]; groups end at the
    cumulative ``offsets`` [E] (int32). An empty group is allowed."""
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


def sequence_balance_loss(
    scores: torch.Tensor, chosen: torch.Tensor, *, batch: int, score_func: ScoreFunc
) -> torch.Tensor:
    """Σ over sequences of Σ_i f_i·P_i (DeepSeek-V3, eqs. 17–20): f_i = E/(k·T) × the tokens
    of the sequence routed to expert i, P_i = its mean normalised score. 1 when balanced.
    scores [B·T, E]; chosen [B·T, k]."""
    num_experts, top_k = scores.shape[-1], chosen.shape[-1]
    scores = scores.view(batch, -1, num_experts)  # [B, T, E]
    if score_func == "sigmoid":  # sigmoid scores do not sum to one: normalise them per token
        scores = scores / scores.sum(-1, keepdim=True)
    seq_len = scores.shape[1]
    routed = torch.zeros_like(scores).scatter_(-1, chosen.view(batch, seq_len, top_k), 1.0)
    f = routed.sum(1) * num_experts / (top_k * seq_len)  # [B, E], no gradient
    p = scores.mean(1)  # [B, E]
    return (f * p).sum()


class MoE(nn.Module):
    """Router → routed experts (dropless: every token reaches its k experts) [+ shared experts].

    Each forward records, for the trainer to read before backward, ``balance_loss`` (a sum over
    the batch's sequences, see ``sequence_balance_loss``) and ``tokens_per_expert`` [E]
    (detached). A forward recomputed by activation checkpointing records them again, equal."""

    shared_experts: FeedForward | None
    balance_loss: torch.Tensor
    tokens_per_expert: torch.Tensor

    def __init__(
        self,
        dim: int,
        *,
        num_experts: int,
        top_k: int,
        hidden_dim: int,
        num_shared_experts: int,
        score_func: ScoreFunc,
        norm_topk_prob: bool,
        route_scale: float,
        backend: ExpertsBackend,
        n_groups: int = 1,
        topk_groups: int = 1,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in 1..num_experts ({num_experts})")
        self.router = Router(
            dim,
            num_experts,
            top_k,
            score_func=score_func,
            norm_topk_prob=norm_topk_prob,
            route_scale=route_scale,
            n_groups=n_groups,
            topk_groups=topk_groups,
        )
        self.experts = GroupedExperts(dim, hidden_dim, num_experts, backend)
        # DeepSeekMoE's shared experts: one SwiGLU as wide as all of them, seen by every token.
        self.shared_experts = (
            FeedForward(dim, hidden_dim * num_shared_experts) if num_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] → [B, T, dim]."""
        batch, _, dim = x.shape
        flat = x.reshape(-1, dim)  # [N, dim]
        scores, chosen, weights = self.router(flat)
        num_experts, top_k = scores.shape[-1], chosen.shape[-1]
        self.balance_loss = sequence_balance_loss(
            scores, chosen, batch=batch, score_func=self.router.score_func
        )
        # Dropless dispatch: the N·k (token, expert) pairs sorted by expert, stably.
        expert_of_pair = chosen.reshape(-1)  # [N·k]
        order = torch.argsort(expert_of_pair, stable=True)
        counts = torch.bincount(expert_of_pair, minlength=num_experts)  # [E]
        self.tokens_per_expert = counts.detach().float()
        routed = self.experts(flat[order // top_k], counts)  # [N·k, dim], sorted
        # Back to (token, choice) order by a gather, then a sum over the k choices: no scatter-
        # add of colliding rows, so the result is deterministic on GPU too.
        routed = routed[torch.argsort(order)].view(-1, top_k, dim)  # [N, k, dim]
        out = (routed * weights.unsqueeze(-1)).sum(1)  # [N, dim]
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view_as(x)
