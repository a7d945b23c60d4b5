"""Optimizers over the trainable parameters of all model parts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tetrad.config.job_config import OptimizerConfig
from tetrad.distributed.utils import group_by_tensor_kind

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}


def _kernel_kwargs(implementation: str, device: torch.device) -> dict[str, bool]:
    # Fused Adam(W) kernels exist for CUDA and CPU; foreach batches the per-tensor loops.
    if implementation == "auto":
        implementation = "fused" if device.type in ("cuda", "cpu") else "foreach"
    return {
        "fused": {"fused": True, "foreach": False},
        "foreach": {"fused": False, "foreach": True},
        "for-loop": {"fused": False, "foreach": False},
    }[implementation]


def build_optimizer(
    model_parts: Iterable[nn.Module], config: OptimizerConfig, device: torch.device
) -> torch.optim.Optimizer:
    """One optimizer over every trainable parameter of every model part (pipeline stages),
    with DTensor and plain parameters in separate groups for the fused/foreach kernels."""
    params = [p for part in model_parts for p in part.parameters() if p.requires_grad]
    return _OPTIMIZERS[config.name](
        [{"params": group} for group in group_by_tensor_kind(params)],
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
        **_kernel_kwargs(config.implementation, device),
    )
