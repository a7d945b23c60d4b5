"""A training batch as every loader yields it, and what packing documents into rows implies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

IGNORE_INDEX = -100
"""Label of a token that is no target: prompt tokens in SFT, padding, a document's first token
after another in the same row."""


@dataclass(frozen=True)
class Batch:
    """``inputs`` and ``labels`` [B, T] int64 (labels: the next token, or ``IGNORE_INDEX``).

    ``document_ids`` [B, T] int64, when rows pack several documents that must not see each
    other: a token attends only to earlier tokens of the same id, and its rotary position counts
    from the start of its document (``document_positions``). None: each row is one causal
    stream, positions 0..T-1, the pretraining default.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        move = None if self.document_ids is None else self.document_ids.to(device)
        return Batch(self.inputs.to(device), self.labels.to(device), move)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """Apply ``fn`` to every [B, T] tensor (e.g. context parallel's sequence shard)."""
        ids = None if self.document_ids is None else fn(self.document_ids)
        return replace(self, inputs=fn(self.inputs), labels=fn(self.labels), document_ids=ids)

    @property
    def num_targets(self) -> int:
        """Tokens that count in the loss."""
        return int((self.labels != IGNORE_INDEX).sum())


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] → each token's index within its document (documents are contiguous runs of one id):
    the rotary positions of packed documents, restarting at 0 where the id changes."""
    index = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index))
    return index - start_index.cummax(dim=-1).values
