"""Every parallel layout against a single-process run of the same global batch.

Each case runs real processes (torchrun, gloo, CPU, fp32, deterministic) from the weights of a
short training run (``trained_weights``: attention already selective, so positions and
query/key gradients matter), saving a DCP checkpoint every step, and so does the reference.
It then checks, against the reference:
- the loss and gradient norm of every step (RTOL);
- every parameter's gradient, as Adam's first moment after step 1, which is exactly
  (1 − β1) · the (clipped) gradient (GRAD_RTOL, per parameter, relative L2 error);
- every parameter's total update over the run, final minus initial weights (UPDATE_RTOL);
- that the layout sharded what it should: each weight and optimizer moment written in as many
  pieces as the layout's degrees imply, and under pipeline parallel only by its stage's ranks.
A global loss or norm hides a wrong gradient of one small parameter (Adam is scale-invariant per
parameter, so even the updates barely move); the per-parameter figures do not.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train
from tests.distributed.dcp_checks import (
    Layout,
    check_sharding,
    exp_avgs,
    model_weights,
    rel_errors,
    step_dir,
)

pytestmark = pytest.mark.slow

RTOL = 1e-5  # fp32: only the summation order differs between layouts
# Per parameter, relative L2 error against the reference. Measured over every layout here (fp32,
# trained tiny weights): step-1 gradient ≤ 2.4e-6 (pp2_fsdp2_zbv; most ≤ 1.2e-6), total update
# over 4 steps ≤ 2.5e-4 (pp2_fsdp2_zbv; most ≤ 5e-5: early Adam steps divide by √v of the same
# gradient and so amplify rounding in small entries). Compile is within the same bounds (≤ 1.2e-6
# and 1.5e-4). A halved, dropped or misplaced gradient moves its parameter's figure by ≥ 1e-1.
GRAD_RTOL = 2e-5
UPDATE_RTOL = 1e-3
_reference_cache: dict[tuple, Path] = {}

Start = Callable[[str], Path]


def flavor(args: list[str] | tuple[str, ...]) -> str:
    return [
        a.split("=", 1)[1]
        for a in ["--model.flavor=tiny", *args]
        if a.startswith("--model.flavor=")
    ][-1]


def start_args(trained_weights: Start | None, *args: str) -> list[str]:
    """Start from the trained weights of the run's model flavor (None: from the model's own
    initialisation or weights, as an HF model's folder has them); checkpoint every step."""
    checkpoints = ["--checkpoint.enable", "--checkpoint.interval=1"]
    if trained_weights is None:
        return checkpoints
    initial = trained_weights(flavor([*TINY_RUN, *args]))
    return [f"--checkpoint.initial_load_path={initial}", *checkpoints]


def reference(
    tmp_path_factory: pytest.TempPathFactory,
    trained_weights: Start | None,
    dp: int,
    accum: int,
    *args: str,
) -> Path:
    """The single-process run's folder (metrics and a checkpoint per step)."""
    key = (trained_weights is None, dp, accum, args)
    if key not in _reference_cache:
        folder = tmp_path_factory.mktemp("reference")
        # -m from REPO: this checkout's tetrad, not whichever one is installed.
        cmd = [sys.executable, "-m", "tests.distributed.reference", f"--dp={dp}"]
        cmd += [f"--accum={accum}", f"--job.dump_folder={folder}", *TINY_RUN, *args]
        cmd += start_args(trained_weights, *args)
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=300)
        _reference_cache[key] = folder
    return _reference_cache[key]


def train(
    folder: Path, trained_weights: Start | None, *args: str, nproc: int, timeout: int = 300
) -> Path:
    run_train(
        folder, *TINY_RUN, *args, *start_args(trained_weights, *args), nproc=nproc, timeout=timeout
    )
    return folder


def assert_parity(
    got: Path,
    want: Path,
    layout: Layout,
    *,
    rtol: float = RTOL,
    grad_norm_rtol: float | None = None,
    grad_rtol: float = GRAD_RTOL,
    update_rtol: float = UPDATE_RTOL,
    initial: Path,
) -> None:
    """``got`` (a parallel run's folder) against ``want`` (the reference's); see the module
    docstring. ``initial``: the checkpoint both started from."""
    got_metrics = assert_metrics_parity(got, want, rtol=rtol, grad_norm_rtol=grad_norm_rtol)
    grads = assert_gradient_parity(got, want, grad_rtol=grad_rtol)
    worst = max(grads, key=grads.__getitem__)
    last = got_metrics[-1]["step"]
    start = model_weights(initial)
    got_w, want_w = model_weights(step_dir(got, last)), model_weights(step_dir(want, last))
    updates = rel_errors(
        {k: v - start[k] for k, v in got_w.items()}, {k: v - start[k] for k, v in want_w.items()}
    )
    worst_u = max(updates, key=updates.__getitem__)
    assert updates[worst_u] <= update_rtol, f"update of {worst_u}: {updates[worst_u]:.2e}"
    n_layers = 1 + max(int(m[1]) for k in start if (m := re.match(r"^layers\.(\d+)\.", k)))
    assert check_sharding(step_dir(got, 1), layout, n_layers) == 3 * len(start)
    print(f"worst: grad {grads[worst]:.2e} ({worst}), update {updates[worst_u]:.2e} ({worst_u})")


def assert_metrics_parity(
    got: Path, want: Path, *, rtol: float, grad_norm_rtol: float | None = None
) -> list[dict[str, float]]:
    """The loss (``rtol``) and gradient norm (``grad_norm_rtol``, default ``rtol``) of every
    step of the run in ``got`` against the reference's in ``want``; returns ``got``'s records."""
    got_metrics, want_metrics = read_metrics(got), read_metrics(want)
    assert [r["step"] for r in got_metrics] == [r["step"] for r in want_metrics]
    for g, w in zip(got_metrics, want_metrics, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=rtol), f"step {g['step']} loss"
        norm_rtol = rtol if grad_norm_rtol is None else grad_norm_rtol
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=norm_rtol), f"step {g['step']}"
    return got_metrics


def assert_gradient_parity(got: Path, want: Path, *, grad_rtol: float) -> dict[str, float]:
    """Every parameter's step-1 gradient (Adam's first moment, from the step-1 checkpoints)
    within ``grad_rtol`` relative L2 error of the reference's; returns the errors by FQN."""
    grads = rel_errors(exp_avgs(step_dir(got, 1)), exp_avgs(step_dir(want, 1)))
    worst = max(grads, key=grads.__getitem__)
    assert grads[worst] <= grad_rtol, f"step-1 gradient of {worst}: {grads[worst]:.2e}"
    return grads


CASES = {
    "fsdp2": (2, 2, ["--parallelism.dp_shard=2"]),
    "fsdp4": (4, 4, ["--parallelism.dp_shard=4"]),
    "hsdp2x2": (4, 4, ["--parallelism.dp_replicate=2", "--parallelism.dp_shard=2"]),
    "ddp2": (2, 2, ["--parallelism.dp_replicate=2", "--parallelism.dp_shard=1"]),
    "tp2_sp": (2, 1, ["--parallelism.tp=2", "--parallelism.dp_shard=1"]),
    "tp2_no_sp": (
        2,
        1,
        [
            "--parallelism.tp=2",
            "--parallelism.dp_shard=1",
            "--parallelism.enable_sequence_parallel=false",
        ],
    ),
    "tp2_no_loss_parallel": (
        2,
        1,
        [
            "--parallelism.tp=2",
            "--parallelism.dp_shard=1",
            "--parallelism.enable_loss_parallel=false",
        ],
    ),
    "fsdp2_tp2": (4, 2, ["--parallelism.tp=2", "--parallelism.dp_shard=2"]),
    "hsdp2x2_tp2": (
        8,
        4,
        ["--parallelism.tp=2", "--parallelism.dp_shard=2", "--parallelism.dp_replicate=2"],
    ),
    "fsdp2_accum2": (2, 2, ["--parallelism.dp_shard=2", "--training.global_batch_size=8"]),
    "fsdp2_cpu_offload": (2, 2, ["--parallelism.dp_shard=2", "--training.enable_cpu_offload"]),
    # Recomputation must not change a single gradient.
    "ac_full": (1, 1, ["--activation_checkpoint.mode=full"]),
    "ac_selective_op": (1, 1, ["--activation_checkpoint.mode=selective"]),
    # Context parallel: each rank holds 2 of 2·cp sequence chunks and all-gathers K/V.
    "cp2": (2, 1, ["--parallelism.cp=2", "--parallelism.dp_shard=1"]),
    "cp4": (4, 1, ["--parallelism.cp=4", "--parallelism.dp_shard=1"]),
    "cp2_fsdp2": (4, 2, ["--parallelism.cp=2", "--parallelism.dp_shard=2"]),
    "cp2_tp2": (4, 1, ["--parallelism.cp=2", "--parallelism.tp=2", "--parallelism.dp_shard=1"]),
    # Recomputation in backward must attend across the cp ranks too.
    "cp2_ac_full": (
        2,
        1,
        ["--parallelism.cp=2", "--parallelism.dp_shard=1", "--activation_checkpoint.mode=full"],
    ),
    "fsdp2_ac_selective_layer": (
        2,
        2,
        [
            "--parallelism.dp_shard=2",
            "--activation_checkpoint.mode=selective",
            "--activation_checkpoint.selective_layer_freq=2",
        ],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layout_matches_single_process(
    name: str, tmp_path, tmp_path_factory, trained_weights
) -> None:
    nproc, dp, args = CASES[name]
    accum = 2 if "accum2" in name else 1
    train(tmp_path, trained_weights, *args, nproc=nproc)
    want = reference(tmp_path_factory, trained_weights, dp, accum)
    assert_parity(tmp_path, want, Layout.from_args(args), initial=trained_weights("tiny"))


# Pipeline layouts: (nproc, reference dp, args shared with the reference, pipeline args).
# Two stages per rank need 4 blocks (tiny_pp) and, with one micro-batch per stage, 4 sequences.
_PP_MULTI = ["--model.flavor=tiny_pp", "--training.local_batch_size=4"]
PP_CASES = {
    "pp2_gpipe": (2, 1, [], ["--parallelism.pp_schedule=GPipe"]),
    "pp2_1f1b": (2, 1, [], ["--parallelism.pp_schedule=1F1B"]),
    "pp2_interleaved1f1b": (2, 1, _PP_MULTI, ["--parallelism.pp_schedule=Interleaved1F1B"]),
    "pp2_looped_bfs": (2, 1, _PP_MULTI, ["--parallelism.pp_schedule=LoopedBFS"]),
    "pp2_interleaved_zb": (2, 1, _PP_MULTI, ["--parallelism.pp_schedule=InterleavedZeroBubble"]),
    "pp2_zbv": (2, 1, _PP_MULTI, ["--parallelism.pp_schedule=ZBVZeroBubble"]),
    "pp2_dualpipev": (2, 1, _PP_MULTI, ["--parallelism.pp_schedule=DualPipeV"]),
    # FSDP must keep parameters gathered for the split backward: the trainer forces it.
    "pp2_fsdp2_zbv": (
        4,
        2,
        _PP_MULTI,
        ["--parallelism.pp_schedule=ZBVZeroBubble", "--parallelism.dp_shard=2"],
    ),
    "pp2_tp2": (4, 1, [], ["--parallelism.tp=2"]),
    "pp2_fsdp2_tp2": (8, 2, [], ["--parallelism.tp=2", "--parallelism.dp_shard=2"]),
    "pp2_cp2_tp2": (8, 1, [], ["--parallelism.cp=2", "--parallelism.tp=2"]),
}


@pytest.mark.parametrize("name", list(PP_CASES))
def test_pipeline_matches_single_process(
    name: str, tmp_path, tmp_path_factory, trained_weights
) -> None:
    nproc, dp, shared, pp_args = PP_CASES[name]
    layout = ["--parallelism.pp=2", "--parallelism.dp_shard=1", *pp_args]
    train(tmp_path, trained_weights, *shared, *layout, nproc=nproc)
    want = reference(tmp_path_factory, trained_weights, dp, 1, *shared)
    initial = trained_weights(flavor(shared))
    assert_parity(tmp_path, want, Layout.from_args(layout), initial=initial)


@pytest.mark.parametrize(
    ("layout", "dp"),
    [
        (["--parallelism.dp_shard=2"], 2),  # per-block compile under FSDP
        (["--parallelism.tp=2", "--parallelism.dp_shard=1"], 1),  # whole-model compile under TP
        (["--parallelism.cp=2", "--parallelism.dp_shard=1"], 1),  # CP attention runs eagerly
    ],
    ids=["fsdp2", "tp2", "cp2"],
)
def test_compile_matches_single_process(
    layout, dp, tmp_path, tmp_path_factory, trained_weights
) -> None:
    # Inductor fuses and reorders floating-point work, hence the looser loss/norm tolerance.
    args = [*layout, "--compile.enable", f"--compile.cache_dir={REPO / '.inductor_cache'}"]
    train(tmp_path, trained_weights, *args, nproc=2, timeout=600)
    want = reference(tmp_path_factory, trained_weights, dp, 1)
    assert_parity(
        tmp_path, want, Layout.from_args(layout), rtol=1e-4, initial=trained_weights("tiny")
    )


def converted(folder: Path, nproc: int, recipe: str, count: int = 14) -> None:
    """Every rank logged that it converted ``count`` linears (4 attention + 3 FFN per block)."""
    for rank in range(nproc):
        log = (folder / "logs" / f"rank{rank}.jsonl").read_text()
        assert f"float8 {recipe}: {count} linears converted" in log, f"rank {rank}"


def assert_low_precision(got: Path, fp32: Path, at_least: float) -> None:
    """The run really computed in low precision: its step-1 gradients are further from the
    fp32 reference's than ``at_least`` (relative, worst parameter), where a run in
    fp32 would be within fp32 rounding (1e-5). Guards against a conversion that logs but is
    off: both the run and its float8 reference would then be fp32 and agree."""
    errors = rel_errors(exp_avgs(step_dir(got, 1)), exp_avgs(step_dir(fp32, 1)))
    assert max(errors.values()) >= at_least, (
        f"step-1 gradients within {max(errors.values()):.1e} of fp32"
    )


def test_float8_with_fsdp_float8_all_gather(tmp_path, tmp_path_factory, trained_weights) -> None:
    float8 = ["--float8.enable", "--float8.enable_fsdp_float8_all_gather"]
    layout = ["--parallelism.dp_shard=2"]
    train(tmp_path, trained_weights, *float8, *layout, nproc=2)
    converted(tmp_path, 2, "tensorwise")
    want = reference(tmp_path_factory, trained_weights, 2, 1, *float8)
    assert_parity(
        tmp_path, want, Layout.from_args(layout), rtol=FSDP_FLOAT8_RTOL,
        grad_rtol=FSDP_FLOAT8_GRAD_RTOL, update_rtol=FSDP_FLOAT8_UPDATE_RTOL,
        initial=trained_weights("tiny"),
    )  # fmt: skip
    assert_low_precision(
        tmp_path, reference(tmp_path_factory, trained_weights, 2, 1), FLOAT8_FROM_FP32
    )


# Tensorwise float8 scales activations per rank-local batch, so FSDP ranks and one process round
# differently: measured against the single-process float8 run (trained weights, 4 steps) loss
# ≤ 4.2e-4 and grad norm ≤ 1.0e-2 relative, per-parameter step-1 gradient ≤ 7.3e-2 and update
# ≤ 2.9e-1 — as far as float8 is from fp32 (8.8e-2), so no tighter bound holds; a halved or
# missing gradient still moves its parameter by ≥ 0.5.
FSDP_FLOAT8_RTOL = 3e-2
FSDP_FLOAT8_GRAD_RTOL = 0.2
FSDP_FLOAT8_UPDATE_RTOL = 0.6
# Float8's own step-1 gradient error against fp32, worst parameter: measured 8.8e-2 … 1.1e-1
# (tensorwise, FSDP 2 and TP 2); a run that silently computes in fp32 is within ~1e-6.
FLOAT8_FROM_FP32 = 1e-2

# float8 re-rounds every matmul input to 3 mantissa bits. Tensor parallel changes only the order
# in which row-parallel partial sums are added (rowwise also scales those layers per shard of the
# summed dim), and each such difference can flip roundings; a scale set by a tensor's or row's
# largest element then re-rounds it whole. Measured over 4 steps (llama3 and Qwen2, TP 2): loss
# ≤ 3e-4 (first step: tensorwise ≤ 4e-6, rowwise 9e-5), grad norm ≤ 2.1e-3 — float8's rounding
# noise, as large as float8's own distance from fp32; a missing, doubled or misplaced reduction
# moves a sum by a whole shard's share instead.
# From the trained weights (tensorwise TP 2, measured): loss ≤ 2e-4, grad norm ≤ 1.2e-2,
# per-parameter step-1 gradient ≤ 4.8e-3 (rowwise + SP: 4.2e-2), update ≤ 9e-2 (rowwise 2e-1).
FLOAT8_RTOL = 1e-3
FLOAT8_GRAD_NORM_RTOL = 3e-2
FLOAT8_TP_GRAD_RTOL = 1e-1
FLOAT8_TP_UPDATE_RTOL = 0.5


@pytest.mark.parametrize(
    ("recipe", "layout"),
    [
        # Sequence parallel all-gathers float8 activations, which gloo cannot carry (NCCL can).
        ("tensorwise", ["--parallelism.enable_sequence_parallel=false"]),
        ("rowwise", []),
    ],
    ids=["tensorwise", "rowwise_sp"],
)
def test_float8_tensor_parallel_matches_single_process(
    recipe: str, layout: list[str], tmp_path, tmp_path_factory, trained_weights
) -> None:
    float8 = ["--float8.enable", f"--float8.recipe={recipe}"]
    layout = ["--parallelism.tp=2", "--parallelism.dp_shard=1", *layout]
    train(tmp_path, trained_weights, *float8, *layout, nproc=2)
    converted(tmp_path, 2, recipe)
    want = reference(tmp_path_factory, trained_weights, 1, 1, *float8)
    assert_parity(
        tmp_path, want, Layout.from_args(layout), rtol=FLOAT8_RTOL,
        grad_norm_rtol=FLOAT8_GRAD_NORM_RTOL, grad_rtol=FLOAT8_TP_GRAD_RTOL,
        update_rtol=FLOAT8_TP_UPDATE_RTOL,
        initial=trained_weights("tiny"),
    )  # fmt: skip
    assert_low_precision(
        tmp_path, reference(tmp_path_factory, trained_weights, 1, 1), FLOAT8_FROM_FP32
    )


def test_mxfp8_fsdp_matches_single_process_and_resumes(
    tmp_path, tmp_path_factory, trained_weights
) -> None:
    # MXFP8's blocks of 32 fall alike on one process and on 2 FSDP ranks (each rank's 128 tokens
    # are whole blocks), so FSDP matches as tightly as in fp32; the run stops after 2 steps and
    # resumes from its checkpoint of FSDP-sharded MXFP8 weights (its own, not the initial one).
    mxfp8 = ["--float8.enable", "--float8.recipe=mxfp8", "--float8.emulate"]
    args = [*mxfp8, "--parallelism.dp_shard=2", "--lr_scheduler.total_steps=4"]
    train(tmp_path, trained_weights, *args, "--training.steps=2", nproc=2)
    train(tmp_path, trained_weights, *args, nproc=2)
    converted(tmp_path, 2, "mxfp8 (emulated)")
    want = reference(
        tmp_path_factory, trained_weights, 2, 1, *mxfp8, "--lr_scheduler.total_steps=4"
    )
    assert_parity(tmp_path, want, Layout(dp_shard=2), initial=trained_weights("tiny"))
    assert_low_precision(
        tmp_path, reference(tmp_path_factory, trained_weights, 2, 1), FLOAT8_FROM_FP32
    )
