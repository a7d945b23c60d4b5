"""Llama 3 model, presets and the model registry."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from tetrad.models import ModelSpec, get_model_spec
from tetrad.models.attention import causal_sdpa
from tetrad.models.llama3 import Llama3Config, RopeScaling, Transformer, llama3_presets
from tetrad.models.llama3.model import count_params, num_flops_per_token, rope_inv_freq
from tetrad.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from tetrad.models.materialize import (
    init_weights,
    materialize_and_init,
    materialize_for_loading,
)

# Published totals (Meta model cards / HF configs), in parameters.
PUBLISHED = {"1B": 1.24e9, "3B": 3.21e9, "8B": 8.03e9, "70B": 70.6e9, "405B": 405.9e9}

TINY = Llama3Config(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=128,
    multiple_of=32,
    rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64),
    max_seq_len=128,
)


def build(config: Llama3Config, seed: int = 0) -> Transformer:
    model = Transformer(config)
    init_weights(model, seed=seed)
    return model


def build_on_meta(config: Llama3Config) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters count once


@pytest.mark.parametrize("flavor", list(llama3_presets))
def test_presets_build_on_meta_and_match_counts(flavor: str) -> None:
    config = get_model_spec("llama3").config_for(flavor, vocab_size=8192)
    model = build_on_meta(config)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert n_params(model) == count_params(config)["total"]
    if flavor in PUBLISHED:
        assert n_params(model) == pytest.approx(PUBLISHED[flavor], rel=5e-3)


def test_405b_meta_build_is_fast() -> None:
    build_on_meta(TINY)  # first-call dispatcher warm-up is not the model's cost
    start = time.perf_counter()
    model = build_on_meta(llama3_presets["405B"])
    assert time.perf_counter() - start < 2.0
    assert all(p.is_meta for p in model.parameters())


def test_presets_hidden_dims() -> None:
    hidden = {name: llama3_presets[name].hidden_dim for name in PUBLISHED}
    assert hidden == {"1B": 8192, "3B": 8192, "8B": 14336, "70B": 28672, "405B": 53248}


def test_debug_param_count_by_hand() -> None:
    config = get_model_spec("llama3").config_for("debug", vocab_size=8192)
    dim, hidden = 256, 768  # hidden: int(2 * 4 * 256 / 3) = 682, rounded up to 256
    attention = 4 * dim * dim  # 16 kv heads: wq, wk, wv, wo all dim x dim
    block = attention + 3 * dim * hidden + 2 * dim
    expected = 8192 * dim + 6 * block + dim + dim * 8192
    assert expected == 9_309_440
    assert n_params(Transformer(config)) == expected


def test_forward_shapes_and_causality() -> None:
    model = build(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, TINY.vocab_size)
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % TINY.vocab_size
    new_logits = model(changed)
    torch.testing.assert_close(new_logits[:, :7], logits[:, :7])
    assert not torch.allclose(new_logits[:, 7:], logits[:, 7:])


def test_pipeline_stage_passes_hidden_states_through() -> None:
    model = build(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    first, last = build(TINY), build(TINY)
    first.norm, first.output = None, None
    del first.layers["1"]
    last.tok_embeddings = None
    del last.layers["0"]
    hidden = first(tokens)
    assert hidden.shape == (2, 8, TINY.dim)
    torch.testing.assert_close(last(hidden), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_meta_init_matches_direct_init(tie: bool) -> None:
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    direct = build(config, seed=7)
    meta = build_on_meta(config)
    materialize_and_init([meta], build_on_meta(config), device=torch.device("cpu"), seed=7)
    assert dict(meta.named_parameters()).keys() == dict(direct.named_parameters()).keys()
    for (name, a), (_, b) in zip(
        [*meta.named_parameters(), *meta.named_buffers()],
        [*direct.named_parameters(), *direct.named_buffers()],
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert (meta.output.weight is meta.tok_embeddings.weight) == tie


@pytest.mark.parametrize("tie", [False, True])
def test_a_pipeline_stage_draws_the_same_weights(tie: bool) -> None:
    # Each module has a seed of its own: a stage that holds only the last block (and, tied,
    # the output layer whose matrix is the embedding's) gets the one-process values for them.
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    direct = build(config, seed=7)
    stage = build_on_meta(config)
    stage.tok_embeddings = None
    del stage.layers["0"]
    materialize_and_init([stage], build_on_meta(config), device=torch.device("cpu"), seed=7)
    want = direct.state_dict()
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    # A different seed changes every module.
    other = build(config, seed=8).state_dict()
    assert all(not torch.equal(other[n], t) for n, t in want.items() if "norm" not in n)


@pytest.mark.parametrize("depth_init", [True, False])
def test_init_stds(depth_init: bool) -> None:
    config = Llama3Config(
        dim=256, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=16, depth_init=depth_init
    )
    model = build(config)
    shrink = 0.9866  # std of a normal truncated at ±3 std, relative to the untruncated one
    expected = {
        "tok_embeddings.weight": 0.02,
        "layers.0.attention.wq.weight": 0.02,
        "layers.3.feed_forward.w1.weight": 0.02,
        "layers.0.attention.wo.weight": 0.02 / math.sqrt(2) if depth_init else 0.02,
        "layers.3.feed_forward.w2.weight": 0.02 / math.sqrt(8) if depth_init else 0.02,
        "output.weight": 256**-0.5,
    }
    params = dict(model.named_parameters())
    for name, std in expected.items():
        weight = params[name]
        assert weight.std().item() == pytest.approx(std * shrink, rel=0.03), name
        assert weight.abs().max().item() <= 3 * std, name
    assert torch.equal(model.norm.weight, torch.ones(256))


def reference_inv_freq(dim: int, theta: float, s: RopeScaling | None) -> list[float]:
    """Llama 3.1's frequency rule, written from its published pseudo-code, one scalar at a time."""
    freqs = [1.0 / theta ** (i / dim) for i in range(0, dim, 2)]
    if s is None:
        return freqs
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * freq / s.factor + smooth * freq)
    return out


@pytest.mark.parametrize("flavor", ["1B", "8B"])
def test_rope_scaling_matches_reference(flavor: str) -> None:
    config = llama3_presets[flavor]
    s = config.rope_scaling
    assert s is not None
    scaled = rope_inv_freq(config).tolist()
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None)).tolist()
    assert scaled == pytest.approx(reference_inv_freq(config.head_dim, config.rope_theta, s))
    assert plain == pytest.approx(reference_inv_freq(config.head_dim, config.rope_theta, None))
    wavelens = [2 * math.pi / f for f in plain]
    high = [i for i, w in enumerate(wavelens) if w < s.original_max_position_embeddings / 4]
    low = [i for i, w in enumerate(wavelens) if w > s.original_max_position_embeddings / 1]
    mid = set(range(len(plain))) - set(high) - set(low)
    assert high and low and mid  # every branch of the rule is exercised
    assert all(scaled[i] == plain[i] for i in high)
    assert all(scaled[i] == pytest.approx(plain[i] / s.factor) for i in low)
    assert all(plain[i] / s.factor < scaled[i] < plain[i] for i in mid)


@pytest.mark.parametrize("side", [-1e-6, 0.0, 1e-6])
@pytest.mark.parametrize("boundary", ["high", "low"])
def test_rope_scaling_at_the_boundaries(boundary: str, side: float) -> None:
    s = RopeScaling(factor=8.0, original_max_position_embeddings=8192)
    divisor = s.high_freq_factor if boundary == "high" else s.low_freq_factor
    wavelen = s.original_max_position_embeddings / divisor * (1 + side)
    theta = (wavelen / (2 * math.pi)) ** 2  # head_dim 4: the second frequency is theta**-0.5
    config = Llama3Config(
        dim=4, n_layers=1, n_heads=1, vocab_size=1, rope_theta=theta, rope_scaling=s
    )
    got = rope_inv_freq(config)[1].item()
    assert got == pytest.approx(reference_inv_freq(4, theta, s)[1], rel=1e-12)
    freq = 2 * math.pi / wavelen
    assert got == pytest.approx(freq if boundary == "high" else freq / s.factor, rel=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_by_hand(tie: bool) -> None:
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    hidden = 192  # int(2 * 4 * 64 / 3) = 170, rounded up to 32
    block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * hidden + 2 * 64  # wq wo, wk wv, FFN, norms
    non_embedding = 2 * block + 64 + 128 * 64  # blocks, final norm, output projection
    attention = 12 * 2 * 64 * 16  # 12 · n_layers · dim · seq_len
    assert num_flops_per_token(config, 16) == 6 * non_embedding + attention == 665_472


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hf_llama(tie: bool) -> None:
    """The state-dict adapter's keys, q/k row order and config.json give transformers' Llama
    tetrad's logits, and its inverse gives back tetrad's exact weights."""
    transformers = pytest.importorskip("transformers")
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    adapter = Llama3StateDictAdapter(config)
    hf_config = transformers.LlamaConfig.from_dict(adapter.hf_config())
    assert hf_config.rope_parameters["rope_type"] == "llama3"
    hf_config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    model = build(config)
    sd = model.state_dict()
    hf_sd = {
        key: piece
        for fqn, tensor in sd.items()
        for key, piece in zip(adapter.hf_keys(fqn), adapter.to_hf(fqn, tensor), strict=False)
    }
    if tie:
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    hf.load_state_dict(hf_sd, strict=True)
    # A sequence longer than the original context puts positions in the scaled regime.
    tokens = torch.randint(0, config.vocab_size, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)
    for fqn, tensor in sd.items():
        if keys := adapter.hf_keys(fqn):
            pieces = [hf.state_dict()[key] for key in keys]
            assert torch.equal(adapter.from_hf(fqn, pieces), tensor), fqn


def test_positions() -> None:
    model = build(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 10))
    with torch.no_grad():
        logits = model(tokens)
        torch.testing.assert_close(model(tokens, torch.arange(10)), logits, rtol=0, atol=0)
        # Rotary attention sees only relative positions, so a common shift changes nothing
        # (beyond rounding), per row of a [B, T] positions tensor too.
        shifted = torch.stack([torch.arange(10) + 37, torch.arange(10) + 90])
        torch.testing.assert_close(model(tokens, shifted), logits)
        # Positions reach the rotary table: reversing them changes the logits.
        assert not torch.allclose(model(tokens, torch.arange(10).flip(0)), logits, atol=1e-3)


def test_unknown_names_suggest_a_match() -> None:
    with pytest.raises(
        ValueError,
        match=r"'lama3'; did you mean 'llama3'\? available: llama3, qwen3_moe, deepseek_moe, hf$",
    ):
        get_model_spec("lama3")
    spec = get_model_spec("llama3")
    with pytest.raises(ValueError) as err:
        spec.config_for("8b", vocab_size=8192)
    assert str(err.value) == (
        "unknown --model.flavor '8b' for llama3; did you mean '8B'? "
        "available: tiny, tiny_pp, debug, 1B, 3B, 8B, 70B, 405B"
    )


def test_config_for_vocab() -> None:
    spec: ModelSpec = get_model_spec("llama3")
    debug = spec.config_for("debug", vocab_size=8192)
    assert debug.vocab_size == 8192 and llama3_presets["debug"].vocab_size == 0
    eight_b = spec.config_for("8B", vocab_size=8192)  # unused rows are allowed
    assert eight_b == llama3_presets["8B"] and eight_b is not llama3_presets["8B"]
    with pytest.raises(ValueError, match="vocab_size 128256, fewer than the tokenizer's 200000"):
        spec.config_for("8B", vocab_size=200_000)
    with pytest.raises(ValueError, match="vocab_size is 0"):
        Transformer(llama3_presets["debug"])


def test_materialize_for_loading_keeps_buffers_and_ties() -> None:
    # A model whose weights a checkpoint fills: to_empty unties the embeddings and leaves the
    # rotary tables as garbage; both must be as in a directly built model.
    config = dataclasses.replace(TINY, tie_embeddings=True)
    model = build_on_meta(config)
    materialize_for_loading([model], torch.device("cpu"))
    assert model.output.weight is model.tok_embeddings.weight
    reference = build(config)
    torch.testing.assert_close(model.rope_cos, reference.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, reference.rope_sin, rtol=0, atol=0)


def test_every_attention_layer_calls_the_runs_attention() -> None:
    """set_attention reaches every layer, and the model computes nothing else for attention: a
    recorder wrapping plain SDPA is called once per layer and leaves the logits unchanged."""
    model = build(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    want = model(tokens)
    calls: list[tuple[int, ...]] = []

    def recorder(q, k, v, *, scale=None, dropout_p=0.0, document_ids=None):
        calls.append((*q.shape, k.shape[1]))
        return causal_sdpa(q, k, v, scale=scale, dropout_p=dropout_p, document_ids=document_ids)

    model.set_attention(recorder)
    torch.testing.assert_close(model(tokens), want, rtol=0, atol=0)
    head_dim = TINY.dim // TINY.n_heads
    assert calls == [(2, TINY.n_heads, 8, head_dim, TINY.kv_heads)] * TINY.n_layers
