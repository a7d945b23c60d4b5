"""tetrad on one GPU, run as a user runs it: what the CPU test suite cannot show.

    python scripts/gpu_check.py OUT_DIR [--dry-run]

Prints one PASS/FAIL/SKIP line per check with its figures, writes them all (loss per step,
median tokens/s and MFU after the first 5 steps, peak memory, wall time, commands) to
OUT_DIR/gpu_check.json and exits 1 if a check failed. bf16 throughout (the GPU default):

  debug_bf16_learns         debug preset, 8 × 256 tokens, 20 steps: the loss falls by ≥ 1.0 nat
                            (from ≈ ln 8192 = 9.0 at initialisation to ≈ 6 on a CPU; a model
                            that does not learn stays near 9)
  1b_compile_sac            1B preset, 4 × 2048 tokens, compile + selective activation
  1b_float8_tensorwise      checkpointing, 30 steps; the same with float8 (tensorwise, rowwise):
  1b_float8_rowwise         tokens/s, MFU and peak memory reported; PASS if the losses are
                            finite and 0 < MFU ≤ 100%
  1b_bf16_optimizer_states  1B as above without compile, 10 steps, Adam states in bf16 against
                            fp32: peak memory must fall by ≥ 2 GiB (2 states × 2 bytes × 1.24B
                            parameters = 4.6 GiB expected)
  resume_exact              debug, 20 steps straight against 10, stopped, and resumed in the same
                            folder for 10 (--debug.deterministic): every step's loss and gradient
                            norm equal bit for bit
  hf_tiny_learns            scripts/make_tiny_hf_model.py's 2-layer Llama through --model.name=hf,
                            20 steps: the loss falls by ≥ 1.0 nat (9.0 → 7.4 on a CPU)
  sft_flex_learns           configs/sft_debug.toml for 40 steps: packed conversations under
                            FlexAttention's block mask (compiled; the CPU runs a dense mask), the
                            loss falls by ≥ 1.0 nat and the held-out val_loss falls
  profile_cuda              debug, 6 steps, profiler windows of 3 and memory snapshots every 3:
                            the traces of steps 3 and 6 hold CUDA kernels, the snapshots of steps
                            3 and 6 load (pickle) with allocator segments and a history
  estimate_matches_peak     1B as 1b_compile_sac without compile, 5 steps: `tetrad estimate
                            --world-size 1` of the same options (fake tensors) within 10% of
                            the run's torch.cuda.max_memory_allocated
  oom_snapshot              1B, 128 × 2048 tokens (~300 GB of activations): the run fails with
                            an OutOfMemoryError whose message names the snapshot of step 1

Cost, estimated (no GPU has run it yet): ~9.5 minutes on one H100 into an empty OUT_DIR, most
of it the three cold compiles of the 1B model; less on a rerun into the same OUT_DIR, whose
Inductor cache they reuse. --dry-run: the same checks on the CPU with the tiny preset, fp32 and
3 steps (a fall of ≥ 0.1 nat; memory saved reported only), skipping the CUDA-only ones; about a
minute on 2 idle cores.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import sys
from collections.abc import Sequence
from functools import partial

from checklib import (
    DRY_RUN,
    REPO,
    Check,
    Context,
    RunFailed,
    Verdict,
    finite_losses,
    main,
    option,
    summary,
)


def loss_falls(check: Check, ctx: Context, args: list[str]) -> Verdict:
    records = ctx.train(check.name, args)
    first, last, drop = records[0]["loss"], records[-1]["loss"], ctx.mode.min_loss_drop
    passed = finite_losses(records) and last <= first - drop
    return Verdict(passed, f"loss {first:.3f} → {last:.3f} (must fall by ≥ {drop})", records)


def hf_loss_falls(check: Check, ctx: Context, args: list[str]) -> Verdict:
    """Build the tiny Hugging Face model folder (offline), then train it."""
    make = [sys.executable, str(REPO / "scripts/make_tiny_hf_model.py")]
    ctx.execute([*make, option(args, "model.hf_path")], ctx.out / check.name / "make_model.log")
    return loss_falls(check, ctx, args)


def sft_learns(check: Check, ctx: Context, args: list[str]) -> Verdict:
    """Chat fine-tuning with validation: the training loss falls, and so does the held-out one
    (judged where there are two evaluations or more)."""
    records = ctx.train(check.name, args)
    train = [r for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    first, last, drop = train[0]["loss"], train[-1]["loss"], ctx.mode.min_loss_drop
    val_falls = bool(val) and (len(val) < 2 or val[-1] < val[0])
    passed = finite_losses(train) and last <= first - drop and val_falls
    trend = " → ".join(f"{v:.3f}" for v in val)
    reason = f"loss {first:.3f} → {last:.3f} (must fall by ≥ {drop}); val_loss {trend} (must fall)"
    return Verdict(passed, reason, train, {"val_loss": val})


def runs_within_peak(check: Check, ctx: Context, args: list[str]) -> Verdict:
    records = ctx.train(check.name, args)
    mfu = summary(records)["mfu"]
    passed = finite_losses(records) and math.isfinite(mfu) and 0 < mfu <= 100
    return Verdict(passed, f"MFU {mfu:.1f}% (must be finite, ≤ 100%; losses finite)", records)


def saves_memory(check: Check, ctx: Context, args: list[str], *, variant: Sequence[str]) -> Verdict:
    """The same run without and with ``variant``: the peak memory it saves."""
    base = summary(ctx.train(f"{check.name}/baseline", args))["memory_gib"]
    records = ctx.train(f"{check.name}/variant", [*args, *variant])
    saved = base - summary(records)["memory_gib"]
    need = ctx.mode.min_memory_saved_gib
    passed = finite_losses(records) and (need is None or saved >= need)
    criterion = "reported only" if need is None else f"must be ≥ {need} GiB"
    reason = f"{' '.join(variant)} saves {saved:.2f} GiB of peak memory ({criterion})"
    figures = {"memory_saved_gib": saved, "baseline_memory_gib": base}
    return Verdict(passed, reason, records, figures)


def resumes_exactly(check: Check, ctx: Context, args: list[str]) -> Verdict:
    """N steps straight against N/2, stopped, then resumed in the same folder."""
    steps = int(option(args, "training.steps"))
    half = steps // 2
    args = [*args, "--debug.deterministic", "--checkpoint.enable", f"--checkpoint.interval={half}"]
    want = ctx.train(f"{check.name}/straight", args)
    stopped = [*args, f"--training.steps={half}", f"--lr_scheduler.total_steps={steps}"]
    ctx.train(f"{check.name}/resumed", stopped)
    got = ctx.train(f"{check.name}/resumed", args, resume=True)
    pairs = zip(got, want, strict=False)
    differ = [
        w["step"] for g, w in pairs if any(g[k] != w[k] for k in ("step", "loss", "grad_norm"))
    ]
    passed = len(got) == len(want) == steps and not differ
    reason = f"{steps} steps straight vs {half} + {steps - half} resumed: " + (
        "losses and grad norms identical bit for bit" if passed else f"differ at steps {differ}"
    )
    return Verdict(passed, reason, got, {"loss_straight": [r["loss"] for r in want]})


def estimate_matches_peak(check: Check, ctx: Context, args: list[str]) -> Verdict:
    """The estimator's total against the measured peak of the same options."""
    records = ctx.train(check.name, args)
    measured = summary(records)["memory_gib"]
    log = ctx.out / check.name / "estimate.log"
    ctx.execute([sys.executable, "-m", "tetrad.cli", "estimate", "--world-size=1", *args], log)
    total = re.search(r"^  total +([0-9.]+) GiB$", log.read_text(), re.MULTILINE)
    estimate = float(total.group(1)) if total else math.nan
    passed = finite_losses(records) and abs(estimate - measured) <= 0.10 * measured
    reason = f"estimate {estimate:.2f} GiB, measured {measured:.2f} GiB (must be within 10%)"
    return Verdict(passed, reason, records, {"estimate_gib": estimate})


def profiles_cuda(check: Check, ctx: Context, args: list[str]) -> Verdict:
    """Traces with GPU kernels and allocator snapshots, at the steps their freq says."""
    records = ctx.train(check.name, args)
    folder, found = ctx.out / check.name, []
    for step in (3, 6):
        trace_path = folder / f"profile_traces/step-{step}/rank0.json"
        snapshot_path = folder / f"memory_snapshot/step-{step}/rank0.pickle"
        if not (trace_path.is_file() and snapshot_path.is_file()):
            return Verdict(False, f"missing {trace_path} or {snapshot_path}", records)
        events = json.loads(trace_path.read_text())["traceEvents"]
        kernels = sum(e.get("cat") == "kernel" for e in events)
        with snapshot_path.open("rb") as f:
            snapshot = pickle.load(f)
        segments, history = len(snapshot["segments"]), sum(map(len, snapshot["device_traces"]))
        found.append((step, kernels, segments, history))
    passed = finite_losses(records) and all(k and s and h for _, k, s, h in found)
    reason = "; ".join(
        f"step {step}: {k} kernels traced, {s} segments, {h} allocator events"
        for step, k, s, h in found
    )
    return Verdict(passed, reason + " (each must be > 0)", records)


def oom_leaves_snapshot(check: Check, ctx: Context, args: list[str]) -> Verdict:
    """A run that cannot fit fails with the out-of-memory error, which names its snapshot."""
    folder = ctx.out / check.name
    try:
        records = ctx.train(check.name, args)
    except RunFailed:
        snapshot = folder / "memory_snapshot/step-1-oom/rank0.pickle"
        log = (folder / "output.log").read_text()
        passed = snapshot.is_file() and "OutOfMemoryError" in log and str(snapshot) in log
        return Verdict(passed, f"{snapshot} written and named in the error: {passed}", [])
    return Verdict(False, "the run fitted in memory: raise its batch", records)


DEBUG = ("--model.flavor=debug", "--training.steps=20")  # 8 × 256 tokens per step (defaults)
ONE_B = (
    "--model.flavor=1B",
    "--training.seq_len=2048",
    "--training.local_batch_size=4",
    "--training.steps=30",
    "--activation_checkpoint.mode=selective",
)
COMPILED = ("--compile.enable", "--compile.cache_dir={out}/inductor_cache")
NO_COMPILE = "compiling a 1B model in bf16 takes many minutes on a CPU"
NO_FLOAT8 = "a CPU emulates float8 matmuls; their speed needs H100-class tensor cores"
NO_CUDA_PEAK = "the reference is torch.cuda.max_memory_allocated; a CPU reports the RSS"
NO_ALLOCATOR = "the point is the GPU kernels in the traces and the CUDA allocator's snapshots"

CHECKS = (
    Check("debug_bf16_learns", loss_falls, DEBUG),
    Check("1b_compile_sac", runs_within_peak, (*ONE_B, *COMPILED), cuda_only=NO_COMPILE),
    *(
        Check(
            f"1b_float8_{recipe}",
            runs_within_peak,
            (*ONE_B, *COMPILED, "--float8.enable", f"--float8.recipe={recipe}"),
            cuda_only=NO_FLOAT8,
        )
        for recipe in ("tensorwise", "rowwise")
    ),
    Check(
        "1b_bf16_optimizer_states",
        partial(saves_memory, variant=("--optimizer.state_dtype=bfloat16",)),
        (*ONE_B, "--training.steps=10"),
    ),
    Check("resume_exact", resumes_exactly, DEBUG),
    Check(
        "hf_tiny_learns",
        hf_loss_falls,
        ("--model.name=hf", "--model.hf_path={out}/tiny_hf_model", "--training.steps=20"),
    ),
    Check(
        "sft_flex_learns",
        sft_learns,
        ("--config=configs/sft_debug.toml", "--training.steps=40", "--validation.freq=20"),
    ),
    Check(
        "profile_cuda",
        profiles_cuda,
        (
            "--model.flavor=debug",
            "--training.steps=6",
            "--profiling.enable",
            "--profiling.freq=3",
            "--profiling.warmup_steps=1",
            "--profiling.enable_memory_snapshot",
            "--profiling.memory_snapshot_freq=3",
        ),
        cuda_only=NO_ALLOCATOR,
    ),
    Check(
        "estimate_matches_peak",
        estimate_matches_peak,
        (*ONE_B[:3], "--training.steps=5", *ONE_B[4:]),
        cuda_only=NO_CUDA_PEAK,
    ),
    Check(
        "oom_snapshot",
        oom_leaves_snapshot,
        (
            "--model.flavor=1B",
            "--training.seq_len=2048",
            "--training.local_batch_size=128",
            "--training.steps=2",
            "--profiling.enable_memory_snapshot",
        ),
        cuda_only=NO_ALLOCATOR,
    ),
)

if __name__ == "__main__":
    sys.exit(main(__doc__, CHECKS, "gpu_check", dry_mode=DRY_RUN, gpus_needed=1))
