"""Hugging Face mixture-of-experts families (Qwen3-MoE, Mixtral) on tetrad's ``MoE`` layer.

The swap: ``build_hf_model`` replaces each decoder layer's sparse-MoE block
(``Qwen3MoeSparseMoeBlock``, ``MixtralSparseMoeBlock``) by a ``tetrad.models.moe.MoE`` holding
the same weights under tetrad's names (``layers.{i}.mlp.router.gate.weight``,
``layers.{i}.mlp.experts.{w1,w3,w2}`` [E, out, in]: gate, up, down) and routing by the same
maths: softmax over the experts' logits in float32, the top k, renormalised to sum to one when
the config's ``norm_topk_prob`` says so (Mixtral always: its softmax over the top-k logits).
Every token reaches its k experts (dropless), as in transformers; expert parallel shards the
stacked ``GroupedExperts`` as it does tetrad's own MoE families.

Checkpoints keep one tensor per expert, as the hub's files and transformers' ``save_pretrained``
store them (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight`` for Qwen3-MoE,
``model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight`` for Mixtral); the routing bias of
auxiliary-loss-free balancing is tetrad's own and is neither loaded nor exported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from tetrad.errors import ConfigError
from tetrad.models.moe.layer import MoE


@dataclass(frozen=True)
class _Format:
    """How a family's config and checkpoint name its sparse-MoE blocks."""

    block: str
    """The block's name in a decoder layer of the checkpoint."""

    expert_width: str
    """The config field holding one expert's SwiGLU width."""

    projections: dict[str, str]
    """tetrad's stacked tensor (w1 gate, w2 down, w3 up) → the per-expert module's name."""


_FORMATS = {
    "qwen3_moe": _Format(
        "mlp", "moe_intermediate_size", {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    ),
    "mixtral": _Format(
        "block_sparse_moe", "intermediate_size", {"w1": "w1", "w2": "w2", "w3": "w3"}
    ),
}
_MOE_FQN = re.compile(
    r"layers\.(\d+)\.mlp\.(router\.gate\.weight|router\.expert_bias|experts\.(w[123]))"
)


def num_experts(hf_config: Any) -> int:
    # transformers 5 stores Qwen3-MoE's num_experts as num_local_experts, as Mixtral's.
    return int(getattr(hf_config, "num_local_experts", None) or hf_config.num_experts)


def top_k(hf_config: Any) -> int:
    return int(hf_config.num_experts_per_tok)


def aux_loss_coef(hf_config: Any) -> float:
    """The coefficient of tetrad's sequence-wise balance loss (1 when balanced) that gives
    transformers' pressure: ``router_aux_loss_coef`` × k (its batch-wise loss is k when
    balanced) when ``output_router_logits`` asks for the loss in training, as in transformers;
    else 0."""
    if not getattr(hf_config, "output_router_logits", False):
        return 0.0
    return float(hf_config.router_aux_loss_coef) * top_k(hf_config)


def check_moe_config(hf_config: Any, source: str) -> None:
    """One line for what the swap does not reproduce."""
    if hf_config.hidden_act != "silu":
        raise ConfigError(
            f"{source}: hidden_act {hf_config.hidden_act!r}; tetrad's experts are SwiGLU (silu)"
        )
    if getattr(hf_config, "router_jitter_noise", 0.0):
        raise ConfigError(
            f"{source}: router_jitter_noise {hf_config.router_jitter_noise} is not implemented "
            "by tetrad's router; pass --model.hf_overrides router_jitter_noise=0"
        )


def swap_moe_blocks(hf_model: Any) -> None:
    """Replace every sparse-MoE block of ``hf_model``'s decoder layers by tetrad's ``MoE``, in
    place, on the current default device (weights uninitialised, as from ``torch.empty``)."""
    c = hf_model.config
    for layer in hf_model.model.layers:
        if not type(layer.mlp).__name__.endswith("SparseMoeBlock"):
            continue  # a dense layer (Qwen3-MoE's mlp_only_layers)
        layer.mlp = MoE(
            c.hidden_size,
            num_experts=num_experts(c),
            top_k=top_k(c),
            hidden_dim=getattr(c, _FORMATS[c.model_type].expert_width),
            num_shared_experts=0,
            score_func="softmax",
            norm_topk_prob=c.model_type == "mixtral" or bool(c.norm_topk_prob),
            route_scale=1.0,
            backend="auto",
        )


def is_stacked(fqn: str) -> bool:
    """Whether ``fqn`` is a routed experts' tensor, one checkpoint key per expert."""
    return (m := _MOE_FQN.fullmatch(fqn)) is not None and m[3] is not None


def moe_hf_keys(hf_config: Any, fqn: str) -> list[str] | None:
    """The checkpoint keys of a swapped block's tensor (none for the routing bias); None for
    any other ``fqn``."""
    if (m := _MOE_FQN.fullmatch(fqn)) is None:
        return None
    fmt = _FORMATS[hf_config.model_type]
    prefix = f"model.layers.{m[1]}.{fmt.block}"
    if m[3] is not None:
        proj = fmt.projections[m[3]]
        return [f"{prefix}.experts.{e}.{proj}.weight" for e in range(num_experts(hf_config))]
    return [f"{prefix}.gate.weight"] if m[2] == "router.gate.weight" else []


def routed_expert_params(model: nn.Module) -> tuple[int, int]:
    """(parameters of all routed experts, of the k a token uses) over the model's MoE layers."""
    total = active = 0
    for module in model.modules():
        if isinstance(module, MoE):
            n = sum(p.numel() for p in module.experts.parameters())
            total += n
            active += n * module.router.top_k // module.router.gate.out_features
    return total, active
