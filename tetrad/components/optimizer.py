"""Optimizers over the trainable parameters of all model parts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from tetrad.config.job_config import OptimizerConfig
from tetrad.distributed.utils import group_by_tensor_kind

_OPTIMIZERS: dict[str, type[torch.optim.Adam]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}


class AdamBF16States(torch.optim.Adam):
    """Adam(W) that stores its moments (exp_avg, exp_avg_sq) in bfloat16 and does the update in
    fp32: half the optimizer memory, at the price of 8-bit-mantissa moments.

    Neither torch.optim (moments take the parameter's dtype) nor torchao.optim (8-bit, 4-bit or
    fp8 moments; its ``_AdamW`` keeps the parameter's dtype) stores plain bf16 moments. Each
    parameter in turn: upcast its moments, update them and the parameter in fp32, round the
    moments to the nearest bf16 for storage (no stochastic rounding). One tensor at a time, so
    the fp32 temporaries never exceed the largest parameter (shard) and the saving holds at the
    step's peak too. The moments of a DTensor parameter are DTensors with its placements, so
    DCP saves and reshards them like the parameter. torch's Adam hyperparameters and state
    keys are kept, so checkpoints look the same; the fused/foreach choice does not apply.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        decoupled_weight_decay: bool,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            foreach=False,
            fused=False,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # torch's own Adam.step is unannotated
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            lr, (beta1, beta2) = float(group["lr"]), group["betas"]
            decay, decoupled = group["weight_decay"], group["decoupled_weight_decay"]
            if params and decoupled and decay != 0:
                torch._foreach_mul_(params, 1 - lr * decay)
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = state["step"].item()
                grad = p.grad if decoupled or decay == 0 else p.grad.add(p, alpha=decay)
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2)
                exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                denom = exp_avg_sq.sqrt_().div_(math.sqrt(1 - beta2**step)).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Optimizer.load_state_dict casts every floating state to its parameter's dtype; the
        # round trip bf16 → fp32 → bf16 is exact, so a resumed run continues bit for bit.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].to(torch.bfloat16)


def _kernel(implementation: str, device: torch.device) -> str:
    """fused, foreach or for-loop. Fused Adam(W) kernels exist for CUDA and CPU; foreach
    batches the per-tensor loops."""
    if implementation == "auto":
        return "fused" if device.type in ("cuda", "cpu") else "foreach"
    return implementation


def build_optimizer(
    model_parts: Iterable[nn.Module], config: OptimizerConfig, device: torch.device
) -> torch.optim.Optimizer:
    """One optimizer over every trainable parameter of every model part (pipeline stages),
    with DTensor and plain parameters in separate groups for the fused/foreach kernels."""
    params = [p for part in model_parts for p in part.parameters() if p.requires_grad]
    groups = [{"params": group} for group in group_by_tensor_kind(params)]
    betas = (config.beta1, config.beta2)
    if config.state_dtype == "bfloat16":
        return AdamBF16States(
            groups,
            lr=config.lr,
            betas=betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            decoupled_weight_decay=config.name == "adamw",
        )
    kernel = _kernel(config.implementation, device)
    return _OPTIMIZERS[config.name](
        groups,
        lr=config.lr,
        betas=betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=kernel == "fused",
        foreach=kernel == "foreach",
    )
