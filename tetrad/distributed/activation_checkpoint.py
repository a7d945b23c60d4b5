"""Activation checkpointing per transformer block: full, every k-th block, or per operator."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from tetrad.config.job_config import ActivationCheckpointConfig

# Outputs worth keeping: matmuls and attention are expensive to recompute and their outputs
# are small next to the elementwise intermediates (norms, SwiGLU, rotary) recomputed instead.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmul_policy(
    ctx: object, op: object, *args: object, **kwargs: object
) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_selective_context() -> Any:  # (forward, recompute) context managers
    return create_selective_checkpoint_contexts(_save_matmul_policy)


def apply_activation_checkpointing(blocks: nn.Module, config: ActivationCheckpointConfig) -> None:
    """Wrap the blocks of ``blocks`` (a ModuleDict or ModuleList) in place; their keys, and so
    checkpoint FQNs, are kept."""
    if config.mode == "none":
        return
    for index, (name, block) in enumerate(list(blocks.named_children())):
        if config.mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif config.selective_layer_freq > 0:
            if index % config.selective_layer_freq:
                continue
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block, preserve_rng_state=False, context_fn=_op_selective_context
            )
        blocks.register_module(name, wrapped)
