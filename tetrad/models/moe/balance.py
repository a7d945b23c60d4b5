"""A model's side of load balancing, shared by every decoder with ``MoE`` layers (tetrad's MoE
families, Hugging Face MoE models after their blocks are swapped): what ``DecoderModel``'s
``auxiliary_loss``/``expert_loads``/``update_after_step`` return, given its MoE layers."""

from __future__ import annotations

import torch
from torch import nn

from tetrad.models.moe.layer import MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    """The model's (or a pipeline stage's) MoE layers, in order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def auxiliary_loss(layers: list[MoE], coef: float, model_layers: int) -> torch.Tensor | None:
    """``coef`` × the last forward's balance loss averaged over the model's ``model_layers``
    MoE layers, of which ``layers`` are this part's (a pipeline stage's share of the mean);
    None if it is off."""
    if not layers or coef == 0:
        return None
    return coef * torch.stack([layer.balance_loss for layer in layers]).sum() / model_layers


def expert_loads(layers: list[MoE]) -> torch.Tensor | None:
    """Tokens per expert of the last forward, [layers, experts]; None without MoE layers."""
    return torch.stack([layer.tokens_per_expert for layer in layers]) if layers else None


def update_biases(layers: list[MoE], loads: torch.Tensor, rate: float) -> None:
    """The auxiliary-loss-free step: each layer's routing bias moves toward balance by ``rate``
    (0: no update)."""
    if rate:
        for layer, load in zip(layers, loads, strict=True):
            layer.router.update_bias(load, rate)
