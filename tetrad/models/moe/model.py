"""Mixture-of-experts decoders: Llama 3's ``Transformer`` with MoE feed-forwards (Qwen3-MoE,
DeepSeek-V3-style), built from its blocks, attention and rotary code.

Module names: those of Llama 3 (``layers["i"].attention.{wq,wk,wv,wo,q_norm,k_norm}``,
``feed_forward``, ...); a MoE layer's ``feed_forward`` is a ``MoE`` (``router.gate``,
``router.expert_bias``, ``experts.{w1,w2,w3}`` [E, out, in], ``shared_experts``). Rotary
embeddings use Meta's interleaved channel pairs; an HF adapter permutes q/k rows and the q/k
norms' weights alike (the norms act per channel, so the permutation commutes with them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tetrad.models.dense import training_flops_per_token
from tetrad.models.llama3.model import RopeScaling, Transformer, TransformerBlock, trunc_normal_
from tetrad.models.moe import balance
from tetrad.models.moe.layer import ExpertsBackend, GroupedExperts, MoE, ScoreFunc

_INIT_STD = 0.02


@dataclass(kw_only=True)
class MoEConfig:
    dim: int
    """Model (residual stream) width."""

    n_layers: int
    """Number of transformer blocks."""

    n_heads: int
    """Query heads per attention layer."""

    n_kv_heads: int
    """Key/value heads (grouped-query attention)."""

    head_dim: int
    """Width of one head; Qwen3 sets it apart from dim / n_heads (30B-A3B: 128 × 32 > 2048)."""

    vocab_size: int
    """Embedding rows; 0 = take it from the tokenizer (see ModelSpec.config_for)."""

    hidden_dim: int
    """SwiGLU width of the dense feed-forwards (the first ``n_dense_layers``)."""

    num_experts: int
    """Routed experts per MoE layer."""

    top_k: int
    """Routed experts each token goes to."""

    moe_hidden_dim: int
    """SwiGLU width of one routed (and one shared) expert."""

    n_dense_layers: int = 0
    """The first blocks keep a dense feed-forward (DeepSeek-V3: 3); the rest are MoE."""

    num_shared_experts: int = 0
    """Experts every token goes to, besides its routed ones (DeepSeek-V3: 1; Qwen3: 0)."""

    score_func: ScoreFunc = "softmax"
    """Router scores: softmax over the experts (Qwen3) or per-expert sigmoid (DeepSeek-V3)."""

    norm_topk_prob: bool = True
    """Renormalise the chosen k scores to sum to one before weighting the experts' outputs."""

    route_scale: float = 1.0
    """Multiplies the gate weights (DeepSeek-V3 671B: 2.5)."""

    n_expert_groups: int = 1
    """Group-limited routing: the experts form this many groups (DeepSeek-V3: 8); 1 = off."""

    topk_groups: int = 1
    """Groups a token's experts may come from, with n_expert_groups > 1 (DeepSeek-V3: 4)."""

    aux_loss_coef: float = 0.0
    """Coefficient of the sequence-wise load-balancing loss (mean over MoE layers) added to the
    training loss; 0 = none."""

    bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing: each step moves every expert's routing bias by this
    much toward balance (DeepSeek-V3: 0.001); 0 = the bias stays 0."""

    qk_norm: bool = False
    """RMSNorm over each query and key head before the rotation (Qwen3)."""

    experts_backend: ExpertsBackend = "auto"
    """How the routed experts run: ``grouped_mm`` (torch._grouped_mm), ``loop`` (one matmul
    per expert), or ``auto`` (grouped_mm for bf16 on CUDA, else loop)."""

    norm_eps: float = 1e-6
    """RMSNorm epsilon."""

    rope_theta: float = 1_000_000.0
    """Rotary base."""

    rope_scaling: RopeScaling | None = None
    """Llama 3.1-style frequency scaling; None = plain rotary embeddings."""

    max_seq_len: int = 4096
    """Length of the rotary table, i.e. the largest position the model can see."""

    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""

    depth_init: bool = True
    """Scale the init std of output projections in block i by 1/sqrt(2·(i+1))."""

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError("n_heads must be a multiple of n_kv_heads, head_dim even")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k {self.top_k} must be in 1..{self.num_experts}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers


class MoETransformer(Transformer):
    """Token ids → logits, with MoE feed-forwards after the first ``n_dense_layers``.

    After each forward the trainer reads ``auxiliary_loss`` and ``expert_loads`` (of this
    part's layers, under pipeline parallel); after each optimizer step it hands the step's
    loads to ``update_after_step`` (the bias update)."""

    config: MoEConfig

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)

    def build_block(self, layer_id: int) -> nn.Module:
        c = self.config
        moe = None
        if c.is_moe_layer(layer_id):
            moe = MoE(
                c.dim,
                num_experts=c.num_experts,
                top_k=c.top_k,
                hidden_dim=c.moe_hidden_dim,
                num_shared_experts=c.num_shared_experts,
                score_func=c.score_func,
                norm_topk_prob=c.norm_topk_prob,
                route_scale=c.route_scale,
                backend=c.experts_backend,
                n_groups=c.n_expert_groups,
                topk_groups=c.topk_groups,
            )
        return TransformerBlock(c, qk_norm=c.qk_norm, feed_forward=moe)

    def moe_layers(self) -> list[MoE]:
        """This part's MoE layers, in order (a pipeline stage holds some)."""
        return balance.moe_layers(self)

    def auxiliary_loss(self) -> torch.Tensor | None:
        c = self.config
        n_moe = sum(c.is_moe_layer(i) for i in range(c.n_layers))
        return balance.auxiliary_loss(self.moe_layers(), c.aux_loss_coef, n_moe)

    def expert_loads(self) -> torch.Tensor | None:
        return balance.expert_loads(self.moe_layers())

    def update_after_step(self, loads: torch.Tensor) -> None:
        balance.update_biases(self.moe_layers(), loads, self.config.bias_update_rate)

    @torch.no_grad()
    def init_buffers(self, buffer_device: torch.device | None = None) -> None:
        """Llama's rotary tables and ties, and zero routing biases (garbage after ``to_empty``;
        a checkpoint loaded afterwards brings its own)."""
        super().init_buffers(buffer_device)
        for layer in self.moe_layers():
            layer.router.expert_bias.zero_()

    @torch.no_grad()
    def init_module_parameters(self, fqn: str, module: nn.Module) -> None:
        """Llama's rules, plus: routed experts' gate/up at std 0.02 and their down projection
        (like the shared experts') shrunk with depth as Llama's residual outputs are."""
        layer_std = (
            self._out_proj_std(int(fqn.split(".")[1])) if fqn.startswith("layers.") else _INIT_STD
        )
        if isinstance(module, GroupedExperts):
            trunc_normal_(module.w1, _INIT_STD)
            trunc_normal_(module.w3, _INIT_STD)
            trunc_normal_(module.w2, layer_std)
        elif fqn.endswith(".shared_experts.w2"):
            trunc_normal_(module.get_parameter("weight"), layer_std)
        else:
            super().init_module_parameters(fqn, module)


def count_params(config: MoEConfig) -> dict[str, int]:
    """Parameters from the config alone (no build): "total", and "active", those one token
    goes through (its k routed experts of each MoE layer, not the others), counting the
    embedding and the output projection; a tied output counts once."""
    c = config
    q_dim, kv_dim = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    attention = 2 * c.dim * (q_dim + kv_dim) + (2 * c.head_dim if c.qk_norm else 0)
    expert = 3 * c.dim * c.moe_hidden_dim
    shared = c.num_shared_experts * expert
    router = c.dim * c.num_experts
    n_moe = sum(c.is_moe_layer(i) for i in range(c.n_layers))
    n_dense = c.n_layers - n_moe
    common = c.n_layers * (attention + 2 * c.dim) + n_dense * 3 * c.dim * c.hidden_dim
    embeddings = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim  # + final norm
    total = common + n_moe * (c.num_experts * expert + shared + router) + embeddings
    active = common + n_moe * (c.top_k * expert + shared + router) + embeddings
    return {"total": total, "active": active}


def num_flops_per_token(config: MoEConfig, seq_len: int) -> int:
    """Training FLOPs per token over the *active* parameters (``training_flops_per_token``):
    an MoE's MFU counts the experts a token uses, not those it skips."""
    active_non_embedding = count_params(config)["active"] - config.vocab_size * config.dim
    if config.tie_embeddings:  # the output projection is a matmul, tied or not
        active_non_embedding += config.vocab_size * config.dim
    return training_flops_per_token(
        active_non_embedding, config.n_layers, config.n_heads * config.head_dim, seq_len
    )
