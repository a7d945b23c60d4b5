"""Expert parallel against a single-process run of the same global batch, as
tests/distributed/test_parity.py does for the dense layouts: loss and gradient norm per step
within RTOL, every parameter's step-1 gradient within GRAD_RTOL (routed experts included, read
back whole from the checkpoints), and each routed expert tensor written in ep × efsdp pieces.

Dropless routing makes the layouts exact up to summation order: every token reaches the same k
experts in every layout, and the expert loads and auxiliary loss in metrics.jsonl must equal the
reference's. The run is qwen3_moe tiny from its initialisation, with the sequence-wise balance
loss on (coefficient 1e-3).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, read_metrics, run_train
from tests.distributed.dcp_checks import metadata, step_dir
from tests.distributed.test_hf_parity import make_tiny
from tests.distributed.test_parity import (
    GRAD_RTOL,
    RTOL,
    assert_gradient_parity,
    assert_metrics_parity,
    reference,
    train,
)

pytestmark = pytest.mark.slow

MOE = ["--model.name=qwen3_moe"]
# Two dense then two MoE blocks: under pp 2, stage 0 holds no expert.
MOE_PP = ["--model.name=deepseek_moe", "--model.flavor=tiny_pp"]
# name: (nproc, reference dp, model, layout)
CASES = {
    "ep2": (2, 2, MOE, ["--parallelism.ep=2"]),
    # Experts split over ep 2 and FSDP-sharded over the other 2 ranks of dp_shard.
    "ep2_fsdp4": (4, 4, MOE, ["--parallelism.ep=2"]),
    # Attention and the output are tensor parallel; the MoE layers get every token, gathered.
    "ep2_fsdp2_tp2": (4, 2, MOE, ["--parallelism.ep=2", "--parallelism.tp=2"]),
    # HSDP: experts replicated over dp_replicate, each replica group an ep group.
    "ep2_hsdp2x2": (4, 4, MOE, ["--parallelism.ep=2", "--parallelism.dp_replicate=2"]),
    # Each pipeline stage's experts over its own ep group (1F1B).
    "pp2_ep2": (4, 2, MOE_PP, ["--parallelism.pp=2", "--parallelism.ep=2"]),
}
ROUTING = ("expert_load_min", "expert_load_max", "expert_load_mean", "aux_loss")


def expert_chunks(folder: Path) -> dict[str, int]:
    """Pieces each routed expert weight was written in."""
    md = metadata(folder).state_dict_metadata
    return {k: len(v.chunks) for k, v in md.items() if ".experts.w" in k and k.startswith("model.")}


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ep2 case's run, which the resume tests start from (a checkpoint every step)."""
    return train(tmp_path_factory.mktemp("ep2"), None, *MOE, *CASES["ep2"][3], nproc=2)


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_matches_single_process(
    name: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, ep2_run: Path
) -> None:
    nproc, dp, model, layout = CASES[name]
    got = ep2_run if name == "ep2" else train(tmp_path, None, *model, *layout, nproc=nproc)
    want = reference(tmp_path_factory, None, dp, 1, *model)
    got_metrics = assert_metrics_parity(got, want, rtol=RTOL)
    for g, w in zip(got_metrics, read_metrics(want), strict=True):
        for key in ROUTING:
            assert g[key] == pytest.approx(w[key], rel=RTOL), f"step {g['step']} {key}"
    assert_gradient_parity(got, want, grad_rtol=GRAD_RTOL)
    # Routed experts: dim 0 over ep, dim 1 over the rest of dp_shard; not over tp, pp or
    # dp_replicate.
    others = math.prod(
        int(a.split("=")[1]) for a in layout if a.split("=")[0].endswith(("tp", "pp", "replicate"))
    )
    chunks = expert_chunks(step_dir(got, 1))
    assert chunks and set(chunks.values()) == {nproc // others}, chunks


# Context parallel needs the balance loss off: HF's default. (nproc, reference dp, layout)
HF_CASES = {
    "ep2": (2, 2, ["--parallelism.ep=2"]),
    # ep spans the cp ranks: each holds a chunk of every sequence, the experts of half.
    "cp2_ep2": (2, 1, ["--parallelism.cp=2", "--parallelism.dp_shard=1", "--parallelism.ep=2"]),
}


@pytest.fixture(scope="module")
def hf_qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny.make_tiny_hf_model(tmp_path_factory.mktemp("hf") / "m", "qwen3_moe")


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hugging_face_moe_under_expert_parallel(
    name: str, hf_qwen3_moe: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A Qwen3-MoE made with transformers, its blocks swapped for tetrad's MoE layer, loaded
    from its safetensors, matches one process."""
    nproc, dp, layout = HF_CASES[name]
    model = ["--model.name=hf", f"--model.hf_path={hf_qwen3_moe}"]
    train(tmp_path, None, *model, *layout, nproc=nproc)
    want = reference(tmp_path_factory, None, dp, 1, *model)
    assert_metrics_parity(tmp_path, want, rtol=RTOL)
    assert_gradient_parity(tmp_path, want, grad_rtol=GRAD_RTOL)
    assert set(expert_chunks(step_dir(tmp_path, 1)).values()) == {2}


def test_resume_under_expert_parallel_is_exact(ep2_run: Path, tmp_path: Path) -> None:
    """EP 2 resumed from its step-2 checkpoint: steps 3 and 4 equal the uninterrupted run's,
    bit for bit (weights, moments, routing biases and the data position all come back)."""
    shutil.copytree(step_dir(ep2_run, 2), step_dir(tmp_path, 2))
    train(tmp_path, None, *MOE, *CASES["ep2"][3], nproc=2)
    want = {r["step"]: r for r in read_metrics(ep2_run)}
    got = read_metrics(tmp_path)
    assert [r["step"] for r in got] == [3, 4]
    for g in got:
        w = want[g["step"]]
        assert [g[k] for k in ("loss", "grad_norm", *ROUTING)] == [
            w[k] for k in ("loss", "grad_norm", *ROUTING)
        ]


def test_expert_parallel_checkpoint_reshards_to_one_process(
    ep2_run: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """EP 2's step-2 checkpoint (experts split over 2 ranks) continues in one process exactly
    as the single-process reference's step-2 checkpoint does: same step-3 loss and gradient
    norm (the data position of 2 dp ranks cannot go to 1, so both start the data afresh)."""
    reference_run = reference(tmp_path_factory, None, 2, 1, *MOE)
    continued = {}
    for name, source in (("ep2", ep2_run), ("reference", reference_run)):
        folder = tmp_path / name
        run_train(
            folder,
            *TINY_RUN,
            *MOE,
            f"--checkpoint.initial_load_path={step_dir(source, 2)}",
            "--checkpoint.exclude_from_loading=dataloader",
            "--training.steps=3",
        )
        (continued[name],) = read_metrics(folder)
    got, want = continued["ep2"], continued["reference"]
    assert got["step"] == want["step"] == 3
    assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
