"""Packing with document masks: windows, labels, document ids and positions from the packer,
and block-causal attention computed two ways (a dense SDPA mask, FlexAttention's block mask)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from tetrad.data import IGNORE_INDEX, document_positions
from tetrad.data.packing import TokenPacker, window_batch
from tetrad.models.attention import FlexDocumentAttention, causal_sdpa


def test_positions_restart_at_each_document() -> None:
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [4, 4, 4, 4, 4, 4, 4, 4]])
    want = [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    assert document_positions(ids).tolist() == want


def test_whole_documents_are_never_split() -> None:
    """Every document lands whole in one window, in order, each window padded after its last
    document; labels are exactly the targets' next tokens within a document."""
    rng = random.Random(0)
    size, pad = 16, 999
    documents = [[rng.randrange(100) for _ in range(rng.randint(2, size))] for _ in range(100)]
    packer = TokenPacker(size, whole_documents=True, pad_id=pad)
    windows = []
    for document in documents:
        # Target: every second token (as assistant turns alternate with prompts).
        packer.add(document, [i % 2 == 1 for i in range(len(document))])
        windows += packer.pop(packer.num_windows)
    found = []
    for window in windows:
        assert len(window.tokens) == size
        pieces = [i for i, start in enumerate(window.starts) if start] + [size]
        for begin, end in itertools.pairwise(pieces):
            piece = window.tokens[begin:end]
            if piece[0] != pad or set(piece) != {pad}:
                found.append(piece)
            else:
                assert end == size and not any(window.targets[begin:end])
    assert found == documents[: len(found)] and len(found) > len(documents) - 2

    batch = window_batch(windows, document_mask=True)
    assert batch.document_ids is not None
    for row, window in enumerate(windows):
        for i in range(size - 1):
            same_document = not window.starts[i + 1]
            want = window.tokens[i + 1] if window.targets[i + 1] and same_document else IGNORE_INDEX
            assert batch.labels[row, i] == want
            if i + 1 < size - 1:  # inputs are the window's first size - 1 tokens
                ids = batch.document_ids[row]
                assert (ids[i + 1] == ids[i]) == same_document


def test_text_stream_keeps_every_label_without_document_mask() -> None:
    packer = TokenPacker(9)
    for document in ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]):
        packer.add(document)
    (window,) = packer.pop(1)
    plain = window_batch([window], document_mask=False)
    assert plain.document_ids is None and plain.labels.tolist() == [[2, 3, 4, 5, 6, 7, 8, 9]]
    masked = window_batch([window], document_mask=True)
    assert masked.labels.tolist() == [[2, 3, 4, 5, IGNORE_INDEX, 7, 8, 9]]
    assert masked.document_ids is not None
    assert masked.document_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]


@pytest.fixture(scope="module")
def attention_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 16, generator=g)
    k, v = (torch.randn(2, 2, 64, 16, generator=g) for _ in range(2))  # grouped-query
    ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64])
    return q, k, v, ids


def test_flex_attention_matches_dense_mask(attention_inputs: tuple[torch.Tensor, ...]) -> None:
    """The GPU path (FlexAttention, compiled) against the CPU path (SDPA with a dense mask), in
    forward on CPU (FlexAttention has no CPU backward); row 1, one document, is plain causal."""
    q, k, v, ids = attention_inputs
    with torch.no_grad():
        dense = causal_sdpa(q, k, v, document_ids=ids)
        flex = FlexDocumentAttention()(q, k, v, document_ids=ids)
        causal = causal_sdpa(q, k, v)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense[1], causal[1], rtol=1e-6, atol=1e-6)
    # Documents B and C would attend to earlier documents without the mask.
    assert (dense[0, :, 20:] - causal[0, :, 20:]).abs().max() > 1e-2
    torch.testing.assert_close(dense[0, :, :20], causal[0, :, :20], rtol=1e-6, atol=1e-6)
