"""tetrad's Qwen3-MoE ↔ the Hugging Face checkpoint format (``Qwen3MoeForCausalLM`` files, as
on the hub and as ``save_pretrained`` writes them): a config from ``config.json`` and tensors
by key.

Two things differ from the dense adapters:
- a routed expert tensor [E, out, in] is E checkpoint tensors
  (``mlp.experts.{e}.gate_proj.weight`` ...), so ``hf_keys`` lists several keys and
  ``from_hf``/``to_hf`` stack and split (a shard's run of experts: the loader reads only those);
- besides wq/wk's rows, the per-head q/k norms' weights take the rotary channel order
  (tetrad's interleaved pairs, see ``tetrad.models.llama3.state_dict_adapter``).
The routing biases of auxiliary-loss-free balancing have no place in the format: a model that
moves them (``bias_update_rate`` > 0) loads from it (biases start at zero) but does not export.
"""

from __future__ import annotations

from typing import Any

import torch

from tetrad.errors import CheckpointError, ConfigError
from tetrad.models.llama3.state_dict_adapter import (
    BLOCK_FQN,
    BLOCK_KEYS,
    TOP_LEVEL_KEYS,
    half_to_interleaved,
    interleaved_to_half,
)
from tetrad.models.moe.model import MoEConfig

_IN_BLOCK = BLOCK_KEYS | {
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.router.gate.weight": "mlp.gate.weight",
}
_EXPERTS = {
    "feed_forward.experts.w1": "gate_proj",
    "feed_forward.experts.w2": "down_proj",
    "feed_forward.experts.w3": "up_proj",
}


def qwen3_moe_config(hf: dict[str, Any], *, max_seq_len: int | None = None) -> MoEConfig:
    """The ``MoEConfig`` of a Qwen3-MoE ``config.json`` (its dict)."""
    if hf.get("model_type") != "qwen3_moe":
        raise ConfigError(f"model_type '{hf.get('model_type')}' is not qwen3_moe")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if hf.get("decoder_sparse_step", 1) != 1 or dense != list(range(len(dense))):
        raise ConfigError(
            "tetrad's MoE models take dense layers only first (mlp_only_layers 0..n-1, "
            f"decoder_sparse_step 1); this config has {dense} and step "
            f"{hf.get('decoder_sparse_step')}"
        )
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_type '{rope['rope_type']}' is not supported for qwen3_moe")
    return MoEConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        vocab_size=hf["vocab_size"],
        hidden_dim=hf["intermediate_size"],
        num_experts=hf.get("num_experts") or hf["num_local_experts"],  # hub or transformers 5
        top_k=hf["num_experts_per_tok"],
        moe_hidden_dim=hf["moe_intermediate_size"],
        n_dense_layers=len(dense),
        norm_topk_prob=hf.get("norm_topk_prob", False),
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        qk_norm=True,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope["rope_theta"],
        max_seq_len=max_seq_len or hf["max_position_embeddings"],
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


class Qwen3MoeStateDictAdapter:
    """Per tensor of one ``MoEConfig`` (Qwen3-MoE: softmax router, no shared experts)."""

    def __init__(self, config: MoEConfig) -> None:
        if config.num_shared_experts or config.score_func != "softmax":
            raise ConfigError("the Qwen3-MoE format has no shared experts and a softmax router")
        self.config = config
        self.tied_keys: set[str] = {"lm_head.weight"} if config.tie_embeddings else set()

    def hf_keys(self, fqn: str) -> list[str]:
        """The checkpoint keys of tetrad's ``fqn``: one, E for a routed expert tensor, none
        for a tied output or the routing bias (tetrad's own, a buffer HF has no place for)."""
        if fqn == "output.weight" and self.config.tie_embeddings:
            return []
        if fqn in TOP_LEVEL_KEYS:
            return [TOP_LEVEL_KEYS[fqn]]
        if m := BLOCK_FQN.match(fqn):
            layer, name = m[1], m[2]
            if name in _IN_BLOCK:
                return [f"model.layers.{layer}.{_IN_BLOCK[name]}"]
            if proj := _EXPERTS.get(name):
                experts = range(self.config.num_experts)
                return [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in experts]
            if name == "feed_forward.router.expert_bias":
                return []
        raise CheckpointError(f"'{fqn}' has no Hugging Face Qwen3MoeForCausalLM counterpart")

    def _rotary_heads(self, fqn: str) -> int | None:
        """Heads whose rows take the rotary channel order (a q/k norm: its one head)."""
        c = self.config
        for suffix, heads in (
            (".attention.wq.weight", c.n_heads),
            (".attention.wk.weight", c.kv_heads),
            (".attention.q_norm.weight", 1),
            (".attention.k_norm.weight", 1),
        ):
            if fqn.endswith(suffix):
                return heads
        return None

    @staticmethod
    def _stacked(fqn: str) -> bool:
        """Whether ``fqn`` is a routed expert tensor, stacked from one key per expert."""
        return (m := BLOCK_FQN.match(fqn)) is not None and m[2] in _EXPERTS

    def from_hf(self, fqn: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The checkpoint's tensors of ``hf_keys(fqn)`` (of a run of experts), in that order →
        tetrad's tensor (those experts' rows)."""
        if self._stacked(fqn):
            return torch.stack(tensors)
        (tensor,) = tensors
        if (heads := self._rotary_heads(fqn)) is None:
            return tensor
        return half_to_interleaved(tensor.view(tensor.shape[0], -1), heads).view_as(tensor)

    def to_hf(self, fqn: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of ``from_hf``."""
        if self._stacked(fqn):
            return list(tensor.unbind(0))
        if (heads := self._rotary_heads(fqn)) is None:
            return [tensor]
        return [interleaved_to_half(tensor.view(tensor.shape[0], -1), heads).view_as(tensor)]

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` that ``transformers.AutoConfig`` reads for this model."""
        c = self.config
        if c.bias_update_rate:
            raise CheckpointError(
                f"this qwen3_moe model routes with auxiliary-loss-free biases (bias_update_rate "
                f"{c.bias_update_rate}), which Qwen3MoeForCausalLM has no place for: its export "
                "would route differently; export a model trained without them"
            )
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "vocab_size": c.vocab_size,
            "hidden_size": c.dim,
            "intermediate_size": c.hidden_dim,
            "moe_intermediate_size": c.moe_hidden_dim,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.kv_heads,
            "head_dim": c.head_dim,
            "num_experts": c.num_experts,
            "num_experts_per_tok": c.top_k,
            "norm_topk_prob": c.norm_topk_prob,
            "mlp_only_layers": list(range(c.n_dense_layers)),
            "decoder_sparse_step": 1,
            "router_aux_loss_coef": c.aux_loss_coef,
            "hidden_act": "silu",
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "tie_word_embeddings": c.tie_embeddings,
            "attention_bias": False,
        }
