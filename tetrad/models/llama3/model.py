"""The Llama 3 decoder (Grattafiori et al. 2024, "The Llama 3 Herd of Models"), incl. 3.1/3.2.

Single-device PyTorch: nothing here knows about meshes. Module names are a contract with the
tensor-parallel plan, the pipeline splitter and the HF state-dict adapter:
``tok_embeddings``, ``layers["0".."n-1"]`` (each with ``attention.{wq,wk,wv,wo}``,
``feed_forward.{w1,w2,w3}``, ``attention_norm``, ``ffn_norm``), ``norm``, ``output``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tetrad.data.batch import document_positions
from tetrad.models.attention import AttentionFn, causal_sdpa
from tetrad.models.dense import DenseDecoderShape
from tetrad.models.spec import DecoderModel

_INIT_STD = 0.02


@dataclass(kw_only=True, frozen=True)
class RopeScaling:
    """Llama 3.1 rotary frequency scaling, which stretches long wavelengths for long context."""

    factor: float = 8.0
    """Low frequencies are divided by this."""

    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled."""

    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are kept."""

    original_max_position_embeddings: int = 8192
    """Context length the unscaled model was pretrained with."""


@dataclass(kw_only=True)
class Llama3Config:
    dim: int
    """Model (residual stream) width."""

    n_layers: int
    """Number of transformer blocks."""

    n_heads: int
    """Query heads per attention layer."""

    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None = n_heads."""

    vocab_size: int
    """Embedding rows; 0 = take it from the tokenizer (see ModelSpec.config_for)."""

    multiple_of: int = 256
    """The FFN hidden width is rounded up to a multiple of this."""

    ffn_dim_multiplier: float | None = None
    """Scales the FFN hidden width before rounding; None = 1."""

    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    rope_theta: float = 500000.0
    """Rotary base; Llama 3 raised it from 10000 to 500000 for longer context."""

    rope_scaling: RopeScaling | None = None
    """Llama 3.1 frequency scaling; None = plain rotary embeddings."""

    max_seq_len: int = 8192
    """Length of the rotary table, i.e. the largest position the model can see."""

    tie_embeddings: bool = False
    """Share the token embedding with the output projection (Llama 3.2 1B/3B)."""

    depth_init: bool = True
    """Scale the init std of wo/w2 in block i by 1/sqrt(2·(i+1)); False = 0.02 everywhere."""

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of even size")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads")

    @property
    def kv_heads(self) -> int:
        """n_kv_heads with None resolved."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4·dim keeps the FFN's parameters equal to a 4·dim GELU MLP
        (Shazeer 2020), then Llama's multiplier and rounding (8B: 14336)."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RotaryAttentionConfig(Protocol):
    """What rotary attention reads of a config: Llama 3's, or another family's that reuses this
    attention (Qwen3-MoE: an explicit head_dim and per-head q/k norms)."""

    @property
    def dim(self) -> int: ...
    @property
    def n_heads(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def norm_eps(self) -> float: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def rope_scaling(self) -> RopeScaling | None: ...
    @property
    def max_seq_len(self) -> int: ...


class DecoderConfig(RotaryAttentionConfig, Protocol):
    """What ``Transformer`` reads of a config (Llama 3's, or a family that reuses it)."""

    @property
    def n_layers(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def hidden_dim(self) -> int: ...
    @property
    def tie_embeddings(self) -> bool: ...
    @property
    def depth_init(self) -> bool: ...


def rope_inv_freq(
    config: RotaryAttentionConfig, device: torch.device | None = None
) -> torch.Tensor:
    """Rotary inverse frequencies theta^(-2i/head_dim), float64 [head_dim // 2].

    With Llama 3.1 scaling, frequencies that complete more than high_freq_factor periods within
    the original context are kept, those completing fewer than low_freq_factor are divided by
    factor, and those in between are interpolated linearly in the number of periods.
    """
    d = config.head_dim
    inv_freq = config.rope_theta ** -(torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    periods = s.original_max_position_embeddings * inv_freq / (2 * math.pi)
    keep = ((periods - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    return keep * inv_freq + (1 - keep) * inv_freq / s.factor


def rope_tables(
    config: RotaryAttentionConfig, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position·inv_freq, float32 [max_seq_len, head_dim // 2].

    Angles are formed in float64: in float32 a position near 131072 would be off by ~0.01 rad.
    """
    positions = torch.arange(config.max_seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(positions, rope_inv_freq(config, device))
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair (x[2i], x[2i+1]) of every head by angle pos·inv_freq[i].

    This is Meta's interleaved layout, as in the original Llama code. HF checkpoints pair channel
    i with i + head_dim/2 ("rotate_half"); the HF adapter permutes the rows of wq and wk.
    x: [B, T, H, head_dim]; cos, sin: [T, head_dim // 2] or [B, T, head_dim // 2].
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, T, H, head_dim // 2]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def trunc_normal_(weight: torch.Tensor, std: float) -> None:
    """A normal of std ``std`` truncated at ±3 std: no outlier weights at initialisation."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class Attention(nn.Module):
    """Causal grouped-query attention (Ainslie et al. 2023) with rotary position embeddings;
    with ``qk_norm``, an RMSNorm over each query and key head before the rotation (Qwen3)."""

    q_norm: nn.RMSNorm | None
    k_norm: nn.RMSNorm | None

    def __init__(self, config: RotaryAttentionConfig, *, qk_norm: bool = False) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        q_dim, kv_dim = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, q_dim, bias=False)
        self.wk = nn.Linear(config.dim, kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, config.dim, bias=False)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if qk_norm else None
        self.attend: AttentionFn = causal_sdpa  # the run's choice: DecoderModel.set_attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        # Head counts come from the projections' sizes, so a column-sharded wq/wk/wv (tensor
        # parallel) simply yields fewer local heads.
        q = self.wq(x).view(bsz, seq_len, -1, self.head_dim)  # [B, T, Hq, head_dim]
        k = self.wk(x).view(bsz, seq_len, -1, self.head_dim)  # [B, T, Hkv, head_dim]
        v = self.wv(x).view(bsz, seq_len, -1, self.head_dim)  # [B, T, Hkv, head_dim]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attend(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), document_ids=document_ids
        )  # [B, Hq, T, hd]
        return self.wo(out.transpose(1, 2).reshape(bsz, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"): w2(silu(w1·x) * w3·x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: h = x + attention(norm(x)); out = h + feed_forward(norm(h)).
    ``feed_forward`` defaults to a SwiGLU MLP of the config's width; another family may pass its
    own (a mixture of experts) and per-head q/k norms."""

    def __init__(
        self,
        config: DecoderConfig,
        *,
        qk_norm: bool = False,
        feed_forward: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.attention = Attention(config, qk_norm=qk_norm)
        self.feed_forward = feed_forward or FeedForward(config.dim, config.hidden_dim)
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # By keyword: tensor parallel gathers attention's one positional input.
        attention_input = self.attention_norm(x)
        h = x + self.attention(attention_input, cos=cos, sin=sin, document_ids=document_ids)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(DecoderModel):
    """Token ids → logits. A pipeline stage may set tok_embeddings, norm and output to None and
    delete entries of ``layers`` (a ModuleDict, so the rest keep their indices and FQNs); it then
    takes and/or returns hidden states [B, T, dim]."""

    tok_embeddings: nn.Embedding | None
    norm: nn.RMSNorm | None
    output: nn.Linear | None
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("vocab_size is 0: resolve it from the tokenizer (config_for)")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict({str(i): self.build_block(i) for i in range(config.n_layers)})
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Derived from the config, never checkpointed; init_buffers recomputes them after to_empty.
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, head_dim // 2]
        self.register_buffer("rope_sin", sin, persistent=False)  # [max_seq_len, head_dim // 2]

    def build_block(self, layer_id: int) -> nn.Module:
        """Block ``layer_id``: Llama's are all alike; a family that varies them overrides this."""
        return TransformerBlock(self.config)

    def _out_proj_std(self, layer_id: int) -> float:
        # Each block adds two residual branches; shrinking their output projections with depth
        # keeps the residual stream's variance in check (cf. GPT-2's 1/sqrt(2·n_layers)).
        return _INIT_STD / math.sqrt(2 * (layer_id + 1)) if self.config.depth_init else _INIT_STD

    def blocks(self) -> nn.ModuleDict:
        return self.layers

    def set_attention(self, attention: AttentionFn) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.attend = attention

    @torch.no_grad()
    def init_buffers(self, buffer_device: torch.device | None = None) -> None:
        """Recompute the rotary tables (garbage after ``to_empty``, in no checkpoint) and re-tie
        the embeddings; parameters are left as they are, e.g. loaded weights."""
        device = buffer_device or self.rope_cos.device
        self.rope_cos, self.rope_sin = rope_tables(self.config, device)
        tied = self.config.tie_embeddings
        if tied and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight  # to_empty unties shared parameters

    @torch.no_grad()
    def init_module_parameters(self, fqn: str, module: nn.Module) -> None:
        """Initialise the own parameters of the submodule at ``fqn`` (full-size; possibly a
        stand-in, see ``tetrad.models.materialize``) from the global RNG: truncated normals
        of std 0.02, output projections of the residual branches shrunk with depth, the output
        layer at dim^-0.5, norms at one."""
        if isinstance(module, nn.RMSNorm):
            module.reset_parameters()
            return
        weight = module.get_parameter("weight")
        if fqn == "output":
            trunc_normal_(weight, self.config.dim**-0.5)
        elif fqn.endswith((".attention.wo", ".feed_forward.w2")):
            trunc_normal_(weight, self._out_proj_std(int(fqn.split(".")[1])))
        else:  # the token embedding and the other projections
            trunc_normal_(weight, _INIT_STD)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: [B, T] ids (or [B, T, dim] hidden states without tok_embeddings).
        positions: [T] or [B, T] rows of the rotary table, default arange(T), or each token's
        index in its document with ``document_ids``; context parallel passes the positions of
        the (non-contiguous) chunks a rank holds. document_ids: [B, T] of the whole sequence,
        for packed documents that must not attend to each other.
        Returns logits [B, T, vocab_size] (or hidden states [B, T, dim] without output)."""
        # Read the length before embedding: under sequence parallel the embedding's output holds
        # only this rank's slice of the sequence, while attention sees all of it.
        seq_len = tokens.shape[1]
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None and document_ids is not None:
            positions = document_positions(document_ids)
        if positions is None:
            cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for layer in self.layers.values():
            h = layer(h, cos, sin, document_ids)  # [B, T, dim]
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def dense_shape(config: Llama3Config) -> DenseDecoderShape:
    return DenseDecoderShape(
        dim=config.dim,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        kv_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_dim=config.hidden_dim,
        vocab_size=config.vocab_size,
        tie_embeddings=config.tie_embeddings,
    )


def count_params(config: Llama3Config) -> dict[str, int]:
    """Parameter counts by top-level module, plus "total" (``DenseDecoderShape``)."""
    return dense_shape(config).count_params(("tok_embeddings", "layers", "norm", "output"))


def num_flops_per_token(config: Llama3Config, seq_len: int) -> int:
    """Training FLOPs per token (``DenseDecoderShape.flops_per_token``)."""
    return dense_shape(config).flops_per_token(seq_len)
