"""tetrad's Llama 3 ↔ Hugging Face ``LlamaForCausalLM``: key names, the rotary row order of wq
and wk, and the ``config.json`` that ``transformers`` reads.

tetrad rotates adjacent channel pairs (2i, 2i+1) of each head, as Meta's original code does;
HF's ``rotate_half`` pairs channel i with i + head_dim/2. The same rotation in either layout is
a fixed reordering of wq's and wk's output rows, head by head, so logits agree exactly up to
rounding.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tetrad.errors import CheckpointError
from tetrad.models.llama3.model import Llama3Config

BLOCK_FQN = re.compile(r"^layers\.(\d+)\.(.+)$")
"""A block's parameter: its index and its name inside the block."""
TOP_LEVEL_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder wq/wk rows [n_heads·head_dim, dim] from interleaved pairs (2i, 2i+1) to
    rotate_half pairs (i, i + head_dim/2), head by head."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_half`."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


class Llama3StateDictAdapter:
    """The per-tensor ``StateDictAdapter`` (tetrad/models/spec.py) of one Llama 3 config."""

    def __init__(self, config: Llama3Config) -> None:
        self.config = config
        # HF keys of tied copies: not exported, ignored where a checkpoint stores them anyway.
        self.tied_keys: set[str] = {"lm_head.weight"} if config.tie_embeddings else set()

    def hf_keys(self, fqn: str) -> list[str]:
        if fqn == "output.weight" and self.config.tie_embeddings:
            return []  # HF stores the tied matrix once, as the embedding
        if fqn in TOP_LEVEL_KEYS:
            return [TOP_LEVEL_KEYS[fqn]]
        if (m := BLOCK_FQN.match(fqn)) and m[2] in BLOCK_KEYS:
            return [f"model.layers.{m[1]}.{BLOCK_KEYS[m[2]]}"]
        raise CheckpointError(
            f"'{fqn}' has no Hugging Face LlamaForCausalLM counterpart: the Llama 3 adapter "
            "maps only tetrad's llama3 Transformer's parameters"
        )

    def _heads(self, fqn: str) -> int | None:
        if fqn.endswith("attention.wq.weight"):
            return self.config.n_heads
        if fqn.endswith("attention.wk.weight"):
            return self.config.kv_heads
        return None

    def to_hf(self, fqn: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        heads = self._heads(fqn)
        return [tensor if heads is None else interleaved_to_half(tensor, heads)]

    def from_hf(self, fqn: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        (tensor,) = tensors
        heads = self._heads(fqn)
        return tensor if heads is None else half_to_interleaved(tensor, heads)

    def hf_config(self) -> dict[str, Any]:
        c = self.config
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "intermediate_size": c.hidden_dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.kv_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.norm_eps,
            "tie_word_embeddings": c.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            # The long-standing keys, which transformers 4.x reads and 5.x converts.
            "rope_theta": c.rope_theta,
        }
        if (s := c.rope_scaling) is not None:
            config["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }
        return config
