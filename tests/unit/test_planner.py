"""`tetrad plan` judges torchtitan's published Llama 3 layouts as fitting, and rejects wrong
ones with the reason. Sources: torchtitan's train_configs (llama3_8b.toml: FSDP 8, local batch
1, seq 8192, selective AC; llama3_70b.toml: TP 8, seq 8192, full AC, here at local batch 2: see
below) and docs/performance.md (405B on 128 H100 of 94 GB: FSDP 16 × TP 8, local batch 2, full
AC); the 405B on 512 ranks as pp 8 × FSDP 8 × TP 8 (stages of 16 blocks, 1F1B, 8 micro-batches).

torchtitan's 70B preset runs local batch 8; the estimate puts that at ~85 GiB on FSDP 32 × TP 8,
most of it loss parallel's cross-entropy (~8.8 GiB a sequence of 8192 on fake tensors), which
no GPU has confirmed yet: scripts/gpu_check.py is where to settle it."""

from __future__ import annotations

import functools

import pytest

from tetrad.config import ConfigError, load_config
from tetrad.plan.dry_run import summarize_rank, tokenizer_vocab_size
from tetrad.plan.estimate import estimate
from tetrad.plan.planner import SCHEDULES, Layout, Planner


@functools.cache  # one planner, hence one set of estimator profiles, per case
def planner(flavor: str, gpus: int, memory_gib: float, seq_len: int = 8192) -> Planner:
    config = load_config([f"--model.flavor={flavor}", f"--training.seq_len={seq_len}"])
    return Planner(config, gpus, memory_gib, "h100")


@pytest.mark.parametrize(
    ("flavor", "gpus", "memory_gib", "layout"),
    [
        ("8B", 8, 80, Layout(dp_shard=8, tp=1, pp=1, ac="selective", local_batch=1)),
        ("70B", 256, 80, Layout(dp_shard=32, tp=8, pp=1, ac="full", local_batch=2)),
        ("405B", 128, 94, Layout(dp_shard=16, tp=8, pp=1, ac="full", local_batch=2)),
        ("405B", 512, 80, Layout(dp_shard=8, tp=8, pp=8, ac="full", local_batch=8)),
    ],
    ids=["8B_fsdp8", "70B_fsdp32_tp8", "405B_fsdp16_tp8", "405B_fsdp8_tp8_pp8"],
)
def test_published_layouts_fit(flavor: str, gpus: int, memory_gib: float, layout: Layout) -> None:
    verdict = planner(flavor, gpus, memory_gib).judge(layout)
    assert verdict.fits, verdict.reason
    assert 0 < verdict.memory_gib <= memory_gib
    assert verdict.step_s > 0


def test_hsdp_is_a_candidate_and_fits_like_its_fsdp_group() -> None:
    """HSDP 32 × FSDP 8 shards each rank's states as FSDP 8 does: the same memory."""
    p = planner("8B", 256, 80)
    assert Layout(8, 1, 1, "selective", 1, dp_replicate=32) in p.layouts()
    hsdp = p.judge(Layout(8, 1, 1, "selective", 1, dp_replicate=32))
    fsdp_8 = planner("8B", 8, 80).judge(Layout(8, 1, 1, "selective", 1))
    assert hsdp.fits and hsdp.memory_gib == pytest.approx(fsdp_8.memory_gib)


def test_tensor_parallel_across_nodes_is_rejected() -> None:
    verdict = planner("70B", 256, 80).judge(Layout(16, 16, 1, "full", 1))
    assert not verdict.fits and "spans nodes" in verdict.reason


def test_too_little_memory_is_rejected() -> None:
    """70B on one node of FSDP 8: 16 bytes per parameter (fp32 weights, gradients, two Adam
    moments) of 70.6B parameters alone are 140 GB a GPU."""
    verdict = planner("70B", 8, 80).judge(Layout(8, 1, 1, "full", 1))
    assert not verdict.fits and "GiB > 80 GiB" in verdict.reason
    assert verdict.memory_gib > 70.6e9 * 16 / 8 / 2**30


def test_context_parallel_fits_a_long_sequence_that_fsdp_alone_does_not() -> None:
    """8B at seq 131072 on 64 GPUs (the Llama 3 paper's long-context stage used cp): FSDP 64
    holds a whole sequence's activations and logits per rank and does not fit; cp 8 splits
    them eight ways. The cp layout is a candidate, and its per-token memory is cp 1's / 8:
    the two differ only by that and by the gathered K/V of one block (full AC) and the
    sharding of the states over 64 ranks either way."""
    p = planner("8B", 64, 80, seq_len=131072)
    cp_8 = Layout(dp_shard=8, tp=1, pp=1, ac="full", local_batch=1, cp=8)
    assert cp_8 in p.layouts()
    alone = p.judge(Layout(dp_shard=64, tp=1, pp=1, ac="full", local_batch=1))
    split = p.judge(cp_8)
    assert not alone.fits and "GiB > 80 GiB" in alone.reason
    assert split.fits, split.reason
    profile = p._profile(1, "full")
    layers = p.model_config.n_layers
    per_token = sum(profile.at(layers)[k] for k in ("activations", "backward temporaries"))
    # 8 kv heads of 128, bf16 K and V, 7/8 of 131072 tokens.
    gathered_kv = 2 * 2 * 131072 * 8 * 128 * 7 / 8
    assert p.gathered_kv_bytes(cp_8) == gathered_kv
    saved = (alone.memory_gib - split.memory_gib) * 2**30
    assert saved == pytest.approx(per_token * 7 / 8 - gathered_kv, rel=0.01)
    assert p.step_terms(cp_8)["cp"] > 0


def test_interleaved_halves_the_1f1b_bubble() -> None:
    """Narayanan et al. 2021: the bubble is (p - 1) / m of the compute for 1F1B and
    (p - 1) / (v·m) for the interleaved schedule of v stages per rank; here v = 2, so the
    same layout's bubble halves, while its compute does not change."""
    p = planner("70B", 256, 80)
    one = Layout(dp_shard=8, tp=8, pp=4, ac="full", local_batch=8)
    two = Layout(dp_shard=8, tp=8, pp=4, ac="full", local_batch=8, schedule="Interleaved1F1B")
    a, b = p.step_terms(one), p.step_terms(two)
    assert a["compute"] == b["compute"]
    assert a["bubble"] == pytest.approx((a["compute"] + a["tp"]) * 3 / 8)
    assert b["bubble"] / a["bubble"] == pytest.approx(SCHEDULES["1F1B"].stages_per_rank / 2)
    assert p.judge(two).step_s < p.judge(one).step_s


def test_schedule_the_trainer_refuses_is_rejected_with_its_reason() -> None:
    """DualPipeV on pp 4 runs 8 stages and needs as many micro-batches: the trainer's own
    pipeline check (plan_pipeline) says so, and the planner passes its reason on."""
    verdict = planner("70B", 256, 80).judge(
        Layout(dp_shard=8, tp=8, pp=4, ac="full", local_batch=4, schedule="DualPipeV")
    )
    assert not verdict.fits
    assert "at least as many micro-batches as stages" in verdict.reason


def test_estimate_of_a_pipeline_rank() -> None:
    """tetrad estimate on pp 2 (tiny: one block a stage), last stage, 8 micro-batches: its
    parameters are the stage's own (the dry run's count, plus the rotary tables the tracker
    files as parameters: within 2%), and its activations those of the micro-batches the
    schedule keeps in flight: 1F1B min(pp, m) = 2, GPipe all m = 8. The last stage's peak
    comes as its forward ends, when it holds exactly one micro-batch's, so GPipe / 1F1B = 4."""
    activations = {}
    for schedule in ("1F1B", "GPipe"):
        config = load_config(
            [
                "--model.flavor=tiny",
                "--training.seq_len=64",
                "--training.local_batch_size=8",
                "--parallelism.pp=2",
                "--parallelism.pp_microbatches=8",
                f"--parallelism.pp_schedule={schedule}",
            ]
        )
        memory = estimate(config, 2, rank=1)
        stage = summarize_rank(config, 2, 1, vocab_size=tokenizer_vocab_size(config))
        assert memory.peak["parameters"] == pytest.approx(stage.local_param_bytes, rel=0.02)
        activations[schedule] = memory.peak["activations"]
    assert activations["GPipe"] / activations["1F1B"] == pytest.approx(8 / 2, rel=1e-6)


def test_a_mixture_of_experts_is_refused_in_one_line() -> None:
    """Not "no layout fits" (every estimate would fail on routing): one line naming why."""
    config = load_config(["--model.name=qwen3_moe", "--model.flavor=tiny"])
    with pytest.raises(ConfigError, match=r"does not cover mixtures of experts.*--dry-run"):
        Planner(config, 8, 80, "h100")
