"""Every parallel layout against a single-process run of the same global batch.

Each case runs real processes (torchrun, gloo, CPU, fp32, deterministic) and compares the loss
of every step and the gradient norm to a single-process reference within RTOL — tight enough
that one wrongly scaled, missing or unreduced gradient shard fails it by orders of magnitude.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train

pytestmark = pytest.mark.slow

RTOL = 1e-5  # fp32: only the summation order differs between layouts
_reference_cache: dict[tuple, list[dict[str, float]]] = {}


def reference(tmp_path_factory: pytest.TempPathFactory, dp: int, accum: int, *args: str):
    key = (dp, accum, args)
    if key not in _reference_cache:
        folder = tmp_path_factory.mktemp("reference")
        # -m from REPO: this checkout's tetrad, not whichever one is installed.
        cmd = [sys.executable, "-m", "tests.distributed.reference", f"--dp={dp}"]
        cmd += [f"--accum={accum}", f"--job.dump_folder={folder}", *TINY_RUN, *args]
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=300)
        _reference_cache[key] = read_metrics(folder)
    return _reference_cache[key]


def assert_parity(got: list[dict[str, float]], want: list[dict[str, float]], rtol: float = RTOL):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=rtol), f"step {g['step']} {key}"


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
def test_layout_matches_single_process(name: str, tmp_path, tmp_path_factory) -> None:
    nproc, dp, args = CASES[name]
    accum = 2 if "accum2" in name else 1
    run_train(tmp_path, *TINY_RUN, *args, nproc=nproc)
    assert_parity(read_metrics(tmp_path), reference(tmp_path_factory, dp, accum))


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
def test_pipeline_matches_single_process(name: str, tmp_path, tmp_path_factory) -> None:
    nproc, dp, shared, pp_args = PP_CASES[name]
    layout = ["--parallelism.pp=2", "--parallelism.dp_shard=1", *pp_args]
    run_train(tmp_path, *TINY_RUN, *shared, *layout, nproc=nproc)
    assert_parity(read_metrics(tmp_path), reference(tmp_path_factory, dp, 1, *shared))


def test_bad_pipeline_split_is_one_line_error(tmp_path: Path) -> None:
    args = ["--parallelism.pp=2", "--parallelism.dp_shard=1"]
    args += ["--parallelism.pp_schedule=Interleaved1F1B"]  # 4 stages of tiny's 2 blocks
    result = run_train(tmp_path, *TINY_RUN, *args, nproc=2, expect_ok=False)
    assert result.returncode != 0
    assert (
        "2 layers do not split evenly into 4 pipeline stages (Interleaved1F1B: 2 per rank × pp 2)"
        in (result.stderr + result.stdout)
    )


def test_bad_mesh_is_one_line_error(tmp_path: Path) -> None:
    result = run_train(
        tmp_path,
        *TINY_RUN,
        "--parallelism.dp_shard=2",
        "--parallelism.tp=2",
        nproc=2,
        expect_ok=False,
    )
    assert result.returncode != 0
    assert (
        "parallelism degrees pp 1 × dp_replicate 1 × dp_shard 2 × cp 1 × tp 2 = 4 ≠ world size 2"
        in (result.stderr + result.stdout)
    )


@pytest.mark.parametrize(
    ("layout", "dp"),
    [
        (["--parallelism.dp_shard=2"], 2),  # per-block compile under FSDP
        (["--parallelism.tp=2", "--parallelism.dp_shard=1"], 1),  # whole-model compile under TP
        (["--parallelism.cp=2", "--parallelism.dp_shard=1"], 1),  # CP attention runs eagerly
    ],
    ids=["fsdp2", "tp2", "cp2"],
)
def test_compile_matches_single_process(layout, dp, tmp_path, tmp_path_factory) -> None:
    # Inductor fuses and reorders floating-point work, hence the looser tolerance.
    args = [*layout, "--compile.enable", f"--compile.cache_dir={REPO / '.inductor_cache'}"]
    run_train(tmp_path, *TINY_RUN, *args, nproc=2, timeout=600)
    assert_parity(read_metrics(tmp_path), reference(tmp_path_factory, dp, 1), rtol=1e-4)


def test_float8_with_fsdp_float8_all_gather(tmp_path, tmp_path_factory) -> None:
    # float8 matmuls and float8 all-gathers round; 1e-2 is far below the loss's fall per step.
    args = ["--parallelism.dp_shard=2", "--float8.enable", "--float8.enable_fsdp_float8_all_gather"]
    run_train(tmp_path, *TINY_RUN, *args, nproc=2)
    for got, want in zip(read_metrics(tmp_path), reference(tmp_path_factory, 2, 1), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-2)


# float8 re-rounds every matmul input to 3 mantissa bits. Tensor parallel changes only the order
# in which row-parallel partial sums are added (rowwise also scales those layers per shard of the
# summed dim), and each such difference can flip roundings; a scale set by a tensor's or row's
# largest element then re-rounds it whole. Measured over 4 steps (llama3 and Qwen2, TP 2): loss
# ≤ 3e-4 (first step: tensorwise ≤ 4e-6, rowwise 9e-5), grad norm ≤ 2.1e-3 — float8's rounding
# noise, as large as float8's own distance from fp32; a missing, doubled or misplaced reduction
# moves a sum by a whole shard's share instead.
FLOAT8_RTOL = 1e-3
FLOAT8_GRAD_NORM_RTOL = 1e-2


def assert_float8_parity(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=FLOAT8_RTOL), f"step {g['step']}"
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=FLOAT8_GRAD_NORM_RTOL)


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
    recipe: str, layout: list[str], tmp_path, tmp_path_factory
) -> None:
    float8 = ["--float8.enable", f"--float8.recipe={recipe}"]
    layout = ["--parallelism.tp=2", "--parallelism.dp_shard=1", *layout]
    run_train(tmp_path, *TINY_RUN, *float8, *layout, nproc=2)
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank{rank}.jsonl").read_text()
        assert f"float8 {recipe}: 14 linears converted" in log
    assert_float8_parity(read_metrics(tmp_path), reference(tmp_path_factory, 1, 1, *float8))


def test_mxfp8_fsdp_matches_single_process_and_resumes(tmp_path, tmp_path_factory) -> None:
    # MXFP8's blocks of 32 fall alike on one process and on 2 FSDP ranks (each rank's 128 tokens
    # are whole blocks), so FSDP matches as tightly as in fp32; the run stops after 2 steps and
    # resumes from its checkpoint of FSDP-sharded MXFP8 weights.
    mxfp8 = ["--float8.enable", "--float8.recipe=mxfp8", "--float8.emulate"]
    args = [*TINY_RUN, *mxfp8, "--parallelism.dp_shard=2", "--checkpoint.enable"]
    args += ["--lr_scheduler.total_steps=4"]
    run_train(tmp_path, *args, "--training.steps=2", nproc=2)
    run_train(tmp_path, *args, nproc=2)
    want = reference(tmp_path_factory, 2, 1, *mxfp8, "--lr_scheduler.total_steps=4")
    assert_parity(read_metrics(tmp_path), want)
