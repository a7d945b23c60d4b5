"""Decoding with a KV cache: the logits of the cached path equal a recompute of the whole
sequence without a cache, for tetrad's llama3 and a Hugging Face family run through tetrad's
attention; the sampler draws only from the tokens top-k and top-p allow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.integration.test_checkpoint import tiny_model
from tetrad.components.generation import Sampler
from tetrad.components.hf_checkpoint import load_hf_weights
from tetrad.config import load_config
from tetrad.data import build_tokenizer
from tetrad.models.attention import causal_sdpa
from tetrad.models.hf import HFStateDictAdapter, build_hf_model, resolve_hf_config
from tetrad.models.kv_cache import KVCache
from tetrad.models.spec import DecoderModel

REPO = Path(__file__).resolve().parents[2]
CACHE_ATOL = 1e-5
"""fp32; the same projections and attention over the same keys, in other shapes."""


def _hf_qwen3(folder: Path) -> DecoderModel:
    spec = importlib.util.spec_from_file_location(
        "make_tiny", REPO / "scripts/make_tiny_hf_model.py"
    )
    assert spec is not None and spec.loader is not None
    make_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny)
    make_tiny.make_tiny_hf_model(folder, "qwen3")
    config = load_config(["--model.name=hf", f"--model.hf_path={folder}"])
    model_config = resolve_hf_config(config, vocab_size=build_tokenizer(str(folder)).vocab_size)
    model = build_hf_model(model_config)
    load_hf_weights(model, folder, HFStateDictAdapter(model_config))
    return model


def _cached_logits(model: DecoderModel, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [B, T - prefill + 1, vocab] at positions prefill-1..T-1: the first ``prefill``
    tokens in one forward, then one token per forward, through a KV cache."""
    cache = KVCache(len(model.blocks()), tokens.shape[1])
    model.set_attention(cache)
    try:
        out = [model(tokens[:, :prefill], positions=torch.arange(prefill))[:, -1]]
        for t in range(prefill, tokens.shape[1]):
            out.append(model(tokens[:, t : t + 1], positions=torch.tensor([t]))[:, -1])
    finally:
        model.set_attention(causal_sdpa)
    assert cache.length == tokens.shape[1]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("family", ["llama3", "hf_qwen3"])
def test_cached_decoding_equals_a_recompute(family: str, tmp_path: Path) -> None:
    model = tiny_model(seed=0) if family == "llama3" else _hf_qwen3(tmp_path / "qwen3")
    model.eval()
    vocab = build_tokenizer(None).vocab_size
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    prefill = 7
    with torch.no_grad():
        cached = _cached_logits(model, tokens, prefill)
        full = model(tokens)[:, prefill - 1 :]  # no cache: causal attention over all of it
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() <= CACHE_ATOL


def _support(sampler: Sampler, logits: torch.Tensor, draws: int = 400) -> set[int]:
    return {int(sampler(logits)) for _ in range(draws)}


def test_sampler_keeps_only_what_top_k_and_top_p_allow() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])  # by rank: 1, 3, 2, then 0 and 4
    logits = probs.log()

    def sampler(**kw: float) -> Sampler:
        options = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
        return Sampler(seed=0, device=torch.device("cpu"), **options)  # type: ignore[arg-type]

    assert int(sampler(temperature=0)(logits)) == 1
    assert _support(sampler(), logits) == {0, 1, 2, 3, 4}
    assert _support(sampler(top_k=2), logits) == {1, 3}
    assert _support(sampler(top_p=0.75), logits) == {1, 3}  # 0.5 + 0.3 reaches 0.75
    assert _support(sampler(top_p=0.85), logits) == {1, 3, 2}
    assert _support(sampler(top_p=0.4), logits) == {1}
    # The same seed draws the same sequence.
    first, second = sampler(), sampler()
    assert [int(first(logits)) for _ in range(50)] == [int(second(logits)) for _ in range(50)]
