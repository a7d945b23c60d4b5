"""Sampling from a decoder: prefill the prompt into a ``KVCache``, then decode one token at a
time, each new token's keys and values appended to the cache.

Every rank of a tensor- or data-parallel layout runs the same loop on the same tokens; the token
rank 0 samples is broadcast, so the ranks never diverge (their logits agree only up to
rounding under some layouts)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tetrad.models.attention import causal_sdpa
from tetrad.models.kv_cache import KVCache
from tetrad.models.spec import DecoderModel


class Sampler:
    """Next token ids [B] from logits [B, vocab]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` likeliest tokens (0 = all) and to
    the smallest set whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al.
    2020), from a generator seeded with ``seed``."""

    def __init__(
        self, *, temperature: float, top_k: int, top_p: float, seed: int, device: torch.device
    ) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator(device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token once the likelier ones reach top_p (the likeliest always stays).
            drop = probs.cumsum(dim=-1) - probs >= self.top_p  # in sorted order
            logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


@dataclass(frozen=True)
class Generation:
    tokens: list[int]
    """The new tokens, the stop token included when one ended the generation."""
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """New tokens over the whole time, prefill included."""
        return len(self.tokens) / (self.prefill_seconds + self.decode_seconds)


def _agreed(token: torch.Tensor) -> torch.Tensor:
    """Rank 0's token on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(token, src=0)
    return token


@torch.no_grad()
def generate(
    model: DecoderModel,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: set[int],
    device: torch.device,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after ``prompt``, ending early at one of ``stop_ids``."""
    model.eval()
    cache = KVCache(len(model.blocks()), len(prompt) + max_new_tokens)
    model.set_attention(cache)
    try:
        begin = time.perf_counter()
        tokens = torch.tensor([list(prompt)], device=device)  # [1, T]
        positions = torch.arange(len(prompt), device=device)
        new: list[int] = []
        prefill_seconds = 0.0
        while len(new) < max_new_tokens:
            logits = model(tokens, positions=positions)[:, -1]  # [1, vocab]
            token = _agreed(sampler(logits))
            new.append(int(token))  # a host sync: the step's time is complete
            if len(new) == 1:
                prefill_seconds = time.perf_counter() - begin
            if new[-1] in stop_ids:
                break
            tokens, positions = token.view(1, 1), positions[-1:] + 1
        return Generation(new, prefill_seconds, time.perf_counter() - begin - prefill_seconds)
    finally:
        model.set_attention(causal_sdpa)
