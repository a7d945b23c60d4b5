"""Checkpoints end to end, as a user runs them: exact resume, resharding on load, a save killed
half-way, seed checkpoints, keep_latest_k, and one-line errors for checkpoints that do not fit."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train
from tetrad.components.checkpoint_folder import COMPLETE, write_complete
from tetrad.components.checkpoint_states import ModelState
from tetrad.components.checkpoint_storage import ChecksumWriter
from tetrad.components.lr_scheduler import wsd_factor
from tetrad.config import load_config
from tetrad.data import build_tokenizer
from tetrad.models.llama3 import Transformer, llama3_presets
from tetrad.models.materialize import init_weights
from tetrad.trainer import Trainer

CHECKPOINTED = [
    *TINY_RUN,
    "--training.steps=6",
    "--lr_scheduler.warmup_steps=2",
    "--checkpoint.enable",
    "--checkpoint.interval=3",
]
TOKENS_PER_STEP = 2 * 64  # local_batch_size × seq_len of TINY_RUN, per dp rank


# Two pipeline stages per rank: the checkpoint holds both under the full model's names.
_PP_INTERLEAVED = [
    "--parallelism.pp=2",
    "--parallelism.dp_shard=1",
    "--parallelism.pp_schedule=Interleaved1F1B",
    "--model.flavor=tiny_pp",
    "--training.local_batch_size=4",
]
# name: (processes, options, steps of the straight run); the resumed run stops half-way.
LAYOUTS = {
    "single_20": (1, [], 20),
    "fsdp2_async": (2, ["--parallelism.dp_shard=2", "--checkpoint.async_mode=async"], 6),
    "pp2_interleaved": (2, _PP_INTERLEAVED, 6),
    "fsdp2_bf16_states": (2, ["--parallelism.dp_shard=2", "--optimizer.state_dtype=bfloat16"], 6),
}


def tiny_model(seed: int, flavor: str = "tiny") -> Transformer:
    """A preset with the embedded tokenizer's vocabulary, initialised as a one-process run does."""
    config = llama3_presets[flavor]
    vocab_size = build_tokenizer(None).vocab_size
    model = Transformer(dataclasses.replace(config, vocab_size=vocab_size))
    init_weights(model, seed=seed)
    return model


def load_model_state(path: Path, flavor: str = "tiny") -> dict[str, torch.Tensor]:
    """A checkpoint's model weights, read back by DCP into a model (no process group)."""
    model = tiny_model(seed=123, flavor=flavor)
    dcp.load({"model": ModelState(model)}, checkpoint_id=str(path))
    return model.state_dict()


def saved_moments(path: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The Adam moments a DCP checkpoint holds, read back whole into this process."""
    dcp_to_torch_save(path, scratch)
    optimizer = torch.load(scratch, weights_only=True)["optimizer"]
    return {k: v for k, v in optimizer.items() if k.endswith(("exp_avg", "exp_avg_sq"))}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_resume_is_bitwise_identical(tmp_path: Path, name: str) -> None:
    nproc, layout, steps = LAYOUTS[name]
    half = steps // 2
    args = [*CHECKPOINTED, *layout, f"--training.steps={steps}", f"--checkpoint.interval={half}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, *args, nproc=nproc)
    # Stop half-way (same LR schedule), then start again in the same folder.
    run_train(
        resumed, *args, f"--training.steps={half}", f"--lr_scheduler.total_steps={steps}",
        nproc=nproc,
    )  # fmt: skip
    assert (resumed / "checkpoint" / f"step-{half}" / COMPLETE).is_file()
    result = run_train(resumed, *args, nproc=nproc)
    dp = 2 if "fsdp2" in name else 1
    local = 4 if "pp2" in name else 2
    tokens = half * local * 64 * dp
    assert f"(step {half}, {tokens} tokens seen)" in result.stdout
    want = read_metrics(straight)
    got = read_metrics(resumed)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for g, w in zip(got, want, strict=True):
        assert (g["loss"], g["grad_norm"], g["lr"]) == (w["loss"], w["grad_norm"], w["lr"])
    names = sorted(p.name for p in (resumed / "checkpoint").iterdir())
    assert names == [f"step-{half}", f"step-{steps}"]
    # The moments, read back from both final checkpoints: same bits, in the dtype asked for.
    want_moments = saved_moments(straight / "checkpoint" / f"step-{steps}", tmp_path / "s.pt")
    got_moments = saved_moments(resumed / "checkpoint" / f"step-{steps}", tmp_path / "r.pt")
    assert got_moments.keys() == want_moments.keys() and len(got_moments) > 0
    dtype = torch.bfloat16 if "--optimizer.state_dtype=bfloat16" in layout else torch.float32
    for key, value in got_moments.items():
        assert value.dtype == dtype, key
        assert torch.equal(value, want_moments[key]), key


@pytest.mark.slow
def test_reshard_fsdp4_to_fsdp2_tp2_and_one_process(tmp_path: Path) -> None:
    """A checkpoint written by 4 FSDP ranks continues on 2 FSDP ranks, 2 TP ranks and 1 process;
    the data position of 4 dp ranks cannot be split otherwise, so it must be left out."""
    common = [
        *CHECKPOINTED,
        "--optimizer.lr=1e-2",
        "--lr_scheduler.total_steps=6",
        "--training.local_batch_size=1",
    ]
    source = tmp_path / "fsdp4"
    run_train(source, *common, "--training.steps=3", "--parallelism.dp_shard=4", nproc=4)
    saved = read_metrics(source)
    start = [*common, f"--checkpoint.initial_load_path={source / 'checkpoint' / 'step-3'}"]

    refused = run_train(tmp_path / "refused", *start, expect_ok=False)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "data position of 4 data-parallel rank(s) but this run has 1" in line
    assert "--checkpoint.exclude_from_loading=dataloader" in line
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()

    start.append("--checkpoint.exclude_from_loading=dataloader")
    layouts = {"single": (1, []), "tp2": (2, ["--parallelism.tp=2"])}
    layouts["fsdp2"] = (2, ["--parallelism.dp_shard=2"])
    losses = {}
    for name, (nproc, layout) in layouts.items():
        result = run_train(tmp_path / name, *start, *layout, nproc=nproc)
        assert "not loaded, starting fresh: dataloader" in result.stdout
        records = read_metrics(tmp_path / name)
        assert [r["step"] for r in records] == [4, 5, 6]  # the step count went on
        # The LR schedule went on where it was (wsd_factor at 0-based steps 3..5).
        lrs = [1e-2 * wsd_factor(s, total_steps=6, warmup_steps=2, decay_ratio=None,
                                 decay_type="linear", min_lr_factor=0.0) for s in (3, 4, 5)]  # fmt: skip
        assert [r["lr"] for r in records] == pytest.approx(lrs, rel=1e-6)
        losses[name] = [r["loss"] for r in records]
    # One process and TP 2 read the same (dp 1) data: same weights and moments, same losses.
    assert losses["tp2"] == pytest.approx(losses["single"], rel=1e-5)
    # Continuous: the loss goes on from where the saved run left it (it keeps falling), far
    # below what the fresh weights of its step 1 gave.
    fresh, last = saved[0]["loss"], saved[-1]["loss"]
    for name, values in losses.items():
        assert values[0] < last + 0.25 and values[0] < fresh - 1.0, (name, values, last)


def train_command(dump_folder: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tetrad.cli", "train", f"--job.dump_folder={dump_folder}", *args]


def test_killed_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL while step-4 is being written: step-2 stays loadable, the partial step-4 and a
    corrupt (truncated) step-3 are reported and skipped, keep_latest_k deletes only complete
    checkpoints, and the resumed steps equal the killed run's."""
    # The debug model's checkpoint (~110 MB) takes about a second to write: time to kill it.
    args = [*TINY_RUN, "--model.flavor=debug", "--checkpoint.enable", "--checkpoint.interval=2"]
    folder = tmp_path / "checkpoint"
    killed = subprocess.Popen(
        train_command(tmp_path, *args, "--training.steps=6"),
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (folder / "step-4.tmp").exists():
            assert killed.poll() is None and time.monotonic() < deadline, "no save of step 4"
            time.sleep(0.005)
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        killed.kill()
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (folder / "step-4").exists() and (folder / "step-2" / COMPLETE).is_file()
    before = read_metrics(tmp_path)
    assert [r["step"] for r in before] == [1, 2, 3, 4]
    # A corrupt checkpoint that claims to be complete and newest: a data file cut short.
    corrupt = folder / "step-3"
    corrupt.mkdir()
    for file in (folder / "step-2").iterdir():
        data = file.read_bytes()
        (corrupt / file.name).write_bytes(
            data[: len(data) // 2] if file.suffix == ".distcp" else data
        )

    result = run_train(
        tmp_path, *args, "--training.steps=4", "--lr_scheduler.total_steps=6",
        "--checkpoint.keep_latest_k=1",
    )  # fmt: skip
    out = result.stdout
    assert (
        f"skipping checkpoint {folder / 'step-3'}: its data file __0_0.distcp is truncated" in out
    )
    assert f"skipping checkpoint {folder / 'step-4.tmp'}: it is a save that did not finish" in out
    assert f"resumed from {folder / 'step-2'}" in out
    # The resumed run replaced the killed run's records of the steps it redid.
    after = read_metrics(tmp_path)
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in after[2:]] == [
        (r["loss"], r["grad_norm"]) for r in before[2:]
    ]
    # keep_latest_k=1 removed step-2 once step-4 was complete; the corrupt step-3 is no
    # complete checkpoint, so it stays for a person to look at.
    assert sorted(p.name for p in folder.iterdir()) == ["step-3", "step-4"]


@pytest.mark.slow
def test_seed_checkpoint_starts_every_layout_from_the_same_weights(tmp_path: Path) -> None:
    """One process initialises (seed 7) and saves step-0, in float32 whatever the export dtype;
    FSDP 2 writes the same seed as shards, bit for bit; FSDP 2 and TP 2 runs (seed 0) start from
    it. With lr 0 a step leaves the weights as they were, so the runs' model-only last saves
    must hold the seed's weights exactly (TP 2 exports them in bfloat16)."""
    seed = tmp_path / "seed"
    run_train(
        seed, *TINY_RUN, "--checkpoint.create_seed_checkpoint", "--debug.seed=7",
        "--checkpoint.export_dtype=bfloat16",
    )  # fmt: skip
    step0 = seed / "checkpoint" / "step-0"
    assert sorted(p.name for p in (seed / "checkpoint").iterdir()) == ["step-0"]
    metadata = dcp.FileSystemReader(str(step0)).read_metadata()
    assert {md.properties.dtype for md in metadata.state_dict_metadata.values()} == {torch.float32}
    assert not (seed / "metrics.jsonl").exists()  # no training step
    weights = load_model_state(step0)
    for name, tensor in tiny_model(seed=7).state_dict().items():
        assert torch.equal(weights[name], tensor), name
    sharded_seed = tmp_path / "sharded_seed"
    run_train(
        sharded_seed, *TINY_RUN, "--checkpoint.create_seed_checkpoint", "--debug.seed=7",
        "--parallelism.dp_shard=2", nproc=2,
    )  # fmt: skip
    sharded = load_model_state(sharded_seed / "checkpoint" / "step-0")
    assert sharded.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(sharded[name], tensor), name
    run_args = [
        *TINY_RUN,
        "--training.steps=1",
        "--optimizer.lr=0",
        "--checkpoint.enable",
        f"--checkpoint.initial_load_path={step0}",
        "--checkpoint.last_save_model_only",
    ]
    layouts = {
        "fsdp2": ["--parallelism.dp_shard=2"],
        "tp2": ["--parallelism.tp=2", "--checkpoint.export_dtype=bfloat16"],
    }
    for name, layout in layouts.items():
        run_train(tmp_path / name, *run_args, *layout, nproc=2)
        step1 = tmp_path / name / "checkpoint" / "step-1"
        metadata = dcp.FileSystemReader(str(step1)).read_metadata()
        assert {key.split(".")[0] for key in metadata.state_dict_metadata} == {"model"}
        dtype = torch.bfloat16 if name == "tp2" else torch.float32
        dtypes = {md.properties.dtype for md in metadata.state_dict_metadata.values()}
        assert dtypes == {dtype}, name
        for key, tensor in load_model_state(step1).items():
            assert torch.equal(tensor, weights[key].to(dtype).float()), (name, key)
    # The start-up line counts the whole model, and on each rank its FSDP shards: dim 0 split as
    # torch.chunk splits it, rank 0 holding the larger half of an odd row count.
    params = list(tiny_model(seed=7).parameters())
    total = sum(p.numel() for p in params)
    rank0 = sum(p[: -(-len(p) // 2)].numel() for p in params)
    assert abs(rank0 - total / 2) <= sum(p[0].numel() for p in params) / 2  # within the padding
    log = (tmp_path / "fsdp2" / "logs" / "rank0.jsonl").read_text()
    assert f"tiny: {total:,} parameters, {rank0:,} on this rank;" in log


def _model_only_checkpoint(path: Path) -> None:
    """A complete model-only checkpoint of the tiny model, written in this process as tetrad
    writes them (with checksums)."""
    tmp = path.with_name(path.name + ".tmp")
    dcp.save({"model": ModelState(tiny_model(seed=0))}, storage_writer=ChecksumWriter(tmp))
    write_complete(tmp, path, step=2, names=["model"])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "initial_load_path {tmp}/nowhere: it does not exist"),
        ("not_a_checkpoint", "it is not a DCP checkpoint (no .metadata file)"),
        (
            "other_shape",
            "does not fit the model: tok_embeddings.weight has shape (8192, 64) in the "
            "checkpoint but (8192, 256) in the model",
        ),
        ("overwrite", "step-2 exists and this run (starting after step 0) would overwrite it"),
        ("load_step", "--checkpoint.load_step 4: {tmp}/run/checkpoint/step-4: it does not exist"),
    ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path: Path, case: str, message: str) -> None:
    run = tmp_path / "run"
    args = [*TINY_RUN, "--checkpoint.enable", "--checkpoint.interval=2"]
    if case == "missing":
        args.append(f"--checkpoint.initial_load_path={tmp_path / 'nowhere'}")
    elif case == "not_a_checkpoint":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("not a checkpoint")
        args.append(f"--checkpoint.initial_load_path={tmp_path / 'notes'}")
    elif case == "other_shape":
        _model_only_checkpoint(tmp_path / "step-2")
        args += [f"--checkpoint.initial_load_path={tmp_path / 'step-2'}", "--model.flavor=debug"]
    elif case == "overwrite":  # the run's folder holds a (model-only) step-2 it would save again
        _model_only_checkpoint(run / "checkpoint" / "step-2")
    else:
        _model_only_checkpoint(run / "checkpoint" / "step-2")
        args.append("--checkpoint.load_step=4")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = run_train(run, *args, expect_ok=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tetrad: error: ") and message.format(tmp=tmp_path) in line
    assert not (run / "metrics.jsonl").exists() and not (run / "config.toml").exists()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in written if p not in before and "logs" not in p.parts] in ([], [Path("run")])


def test_fine_tune_start_takes_the_new_schedule(tmp_path: Path) -> None:
    """Loading a finished run's optimizer without its scheduler or step (a fine-tune): the
    optimizer's saved LR (0 at the end of a linear decay) must not outlive the load."""
    args = [*TINY_RUN, "--training.steps=2", "--checkpoint.enable"]
    pretrain = Trainer(load_config([*args, f"--job.dump_folder={tmp_path / 'pretrain'}"]))
    try:
        pretrain.train()
        assert pretrain.optimizer.param_groups[0]["lr"] == 0.0
    finally:
        pretrain.close()
    step2 = tmp_path / "pretrain" / "checkpoint" / "step-2"
    fine_tune = Trainer(
        load_config(
            [
                *args,
                f"--job.dump_folder={tmp_path / 'fine_tune'}",
                f"--checkpoint.initial_load_path={step2}",
                "--checkpoint.exclude_from_loading=lr_scheduler,train_state,dataloader",
                "--lr_scheduler.warmup_steps=2",
            ]
        )
    )
    try:
        assert fine_tune.train_state.step == 0
        assert fine_tune.optimizer.state  # the moments were loaded
        lr = fine_tune.optimizer.param_groups[0]["lr"]
        assert lr == fine_tune.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-3 / 2)
    finally:
        fine_tune.close()
    # A full checkpoint under another name than step-N goes on from its own step.
    shutil.copytree(step2, tmp_path / "final")
    go_on = Trainer(
        load_config(
            [
                *args,
                "--training.steps=4",
                f"--job.dump_folder={tmp_path / 'go_on'}",
                f"--checkpoint.initial_load_path={tmp_path / 'final'}",
            ]
        )
    )
    try:
        assert go_on.train_state.step == 2
        assert go_on.train_state.tokens_seen == 2 * TOKENS_PER_STEP
    finally:
        go_on.close()
