"""Packing documents into fixed-length training windows.

Two policies, one window format. A stream cut (pretraining) concatenates documents and cuts
disjoint windows, with no padding and no token lost; a document may continue in the next window.
Whole-document packing (conversations) never splits a document: one that does not fit the open
window closes it, padded, and opens the next. Either way a window remembers, per token, whether it
is a training target and whether it starts a document, which is all that labels, document masks
and rotary positions need (``window_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from tetrad.data.batch import IGNORE_INDEX, Batch


class Window(NamedTuple):
    """``size`` tokens; per token: a target of the loss, the first token of a document."""

    tokens: list[int]
    targets: list[bool]
    starts: list[bool]


class TokenPacker:
    """Windows of ``size`` = seq_len + 1 tokens, so that one window gives both the inputs (its
    first seq_len tokens) and the labels (its last seq_len). Tokens that do not yet fill a window
    wait in the carry, which with the windows already closed is the packer's whole state.

    ``whole_documents=False``: the stream cut. Window i is stream[i·size : (i+1)·size].
    ``whole_documents=True``: a document that does not fit the open window's free space pads
    that window with ``pad_id`` (no targets, a document of its own) and starts the next one;
    documents must be at most ``size`` tokens (the caller truncates or drops longer ones).
    """

    def __init__(self, size: int, *, whole_documents: bool = False, pad_id: int = 0) -> None:
        if size < 2:
            raise ValueError(f"a window needs at least 2 tokens (one input, one label), got {size}")
        self.size = size
        self.whole_documents = whole_documents
        self.pad_id = pad_id
        self._carry = Window([], [], [])
        self._closed: list[Window] = []  # whole-document windows, padded, ready to pop

    @property
    def num_windows(self) -> int:
        """Full windows ready to pop."""
        if self.whole_documents:
            return len(self._closed)
        return len(self._carry.tokens) // self.size

    def add(self, tokens: Sequence[int], targets: Sequence[bool] | None = None) -> None:
        """Append one document; ``targets`` per token, default all (pretraining)."""
        if targets is not None and len(targets) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens but {len(targets)} target flags")
        if self.whole_documents:
            if len(tokens) > self.size:
                raise ValueError(
                    f"a document of {len(tokens)} tokens exceeds the {self.size}-window"
                )
            if len(self._carry.tokens) + len(tokens) > self.size:
                self._close_padded()
        carry = self._carry
        carry.tokens.extend(tokens)
        carry.targets.extend([True] * len(tokens) if targets is None else targets)
        carry.starts.extend([True] + [False] * (len(tokens) - 1) if tokens else [])

    def _close_padded(self) -> None:
        pad = self.size - len(self._carry.tokens)
        carry = self._carry
        carry.tokens.extend([self.pad_id] * pad)
        carry.targets.extend([False] * pad)
        carry.starts.extend([True] + [False] * (pad - 1) if pad else [])
        self._closed.append(carry)
        self._carry = Window([], [], [])

    def pop(self, n: int) -> list[Window]:
        """The next ``n`` windows."""
        if n > self.num_windows:
            raise ValueError(f"asked for {n} windows, only {self.num_windows} are full")
        if self.whole_documents:
            windows, self._closed = self._closed[:n], self._closed[n:]
            return windows
        end, c = n * self.size, self._carry
        windows = [
            Window(
                c.tokens[i : i + self.size],
                c.targets[i : i + self.size],
                c.starts[i : i + self.size],
            )
            for i in range(0, end, self.size)
        ]
        self._carry = Window(c.tokens[end:], c.targets[end:], c.starts[end:])
        return windows

    def state_dict(self) -> dict[str, object]:
        return {"carry": self._carry._asdict(), "closed": [w._asdict() for w in self._closed]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        carry, closed = state["carry"], state["closed"]
        assert isinstance(carry, dict) and isinstance(closed, list)
        self._carry = Window(**{k: list(v) for k, v in carry.items()})
        self._closed = [Window(**{k: list(v) for k, v in w.items()}) for w in closed]


def window_batch(windows: Sequence[Window], *, document_mask: bool) -> Batch:
    """Windows of seq_len + 1 tokens → a Batch of [len(windows), seq_len].

    Labels are the next tokens, ignored where the next token is not a target. With
    ``document_mask``, rows carry document ids (a window's first token opens a document, even a
    continued one) and a label that would cross into the next document is ignored: no token is
    trained to predict another document's first token, which it cannot see. Without, each row is
    one causal stream and every next token is a label, as pretraining has always done.
    """
    tokens = torch.tensor([w.tokens for w in windows], dtype=torch.long)  # [B, S+1]
    targets = torch.tensor([w.targets for w in windows], dtype=torch.bool)
    starts = torch.tensor([w.starts for w in windows], dtype=torch.bool)
    keep = targets[:, 1:]
    document_ids = None
    if document_mask:
        keep = keep & ~starts[:, 1:]
        starts[:, 0] = True
        document_ids = starts[:, :-1].long().cumsum(dim=1) - 1  # [B, S], 0.. per row
    labels = torch.where(keep, tokens[:, 1:], IGNORE_INDEX)
    return Batch(tokens[:, :-1].contiguous(), labels.contiguous(), document_ids)
