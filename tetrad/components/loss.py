"""The language-modelling loss: summed token cross-entropy, normalised by the caller.

Summing per micro-batch and dividing by the token count of the whole global batch makes
gradient accumulation and data parallelism exact even when ranks or micro-batches hold different
numbers of target tokens (masked prompts in SFT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tetrad.data.batch import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "cross_entropy_sum"]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], labels [B, T] → scalar sum over tokens whose label isn't ignored."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        labels.flatten(),
        reduction="sum",
        ignore_index=IGNORE_INDEX,
    )
