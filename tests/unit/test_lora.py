"""LoRA through the Trainer, in one process: the base stays bit-identical to where it started
(Hugging Face weights, a pre-trained DCP checkpoint), only adapters are optimised and, with
--lora.save_adapters_only, saved; a resumed adapters-only run continues exactly; the exports
(--checkpoint.last_save_in_hf, `tetrad convert`) merge the adapters and give the adapted
model's logits in transformers; what LoRA cannot take is a one-line error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import TINY_RUN, read_metrics
from tests.distributed.dcp_checks import metadata, model_weights, step_dir
from tests.integration.test_checkpoint import tiny_model
from tests.unit.test_hf_trainer import RUN as HF_RUN
from tests.unit.test_hf_trainer import make_tiny
from tetrad.cli import main as tetrad
from tetrad.config import ConfigError, load_config, validate_config
from tetrad.models.hf import HFStateDictAdapter
from tetrad.models.lora import is_adapter
from tetrad.trainer import Trainer

LOGITS_ATOL = 1e-5  # fp32: W + s·B·A merged once against x·Wᵀ + s·(x·Aᵀ)·Bᵀ, same model
ALL_TARGETS = "--lora.targets=q,k,v,o,gate,up,down"


def train(*args: str) -> dict[str, torch.Tensor]:
    """Train in this process; the model's final state (plain tensors, by FQN)."""
    trainer = Trainer(load_config(list(args)))
    try:
        trainer.train()
        (model,) = trainer.model_parts
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        trainer.close()


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(tokens)
    return out.logits if hasattr(out, "logits") else out


def test_fresh_start_is_the_base_model(tmp_path: Path) -> None:
    """Initialised from the seed: the base exactly as without LoRA, B zero, so the same logits;
    A drawn within nn.Linear's default bound 1/sqrt(in)."""
    config = load_config([*TINY_RUN, f"--job.dump_folder={tmp_path}", "--lora.rank=4", ALL_TARGETS])
    trainer = Trainer(config)
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))
    try:
        (model,) = trainer.model_parts
        got = logits(model, tokens)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        trainer.close()
    base = tiny_model(seed=0)
    assert state.keys() - base.state_dict().keys() == {k for k in state if is_adapter(k)}
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert torch.equal(got, logits(base, tokens))
    for fqn, a in state.items():
        if fqn.endswith("lora_a"):
            bound = a.shape[1] ** -0.5
            assert 0.9 * bound < a.abs().max() <= bound, fqn
        elif fqn.endswith("lora_b"):
            assert not a.any(), fqn


def test_hf_lora_keeps_base_and_exports_merged(tmp_path: Path) -> None:
    folder = make_tiny.make_tiny_hf_model(tmp_path / "qwen3", "qwen3")
    run = tmp_path / "run"
    config = load_config(
        [*HF_RUN, f"--model.hf_path={folder}", f"--job.dump_folder={run}", "--training.steps=3",
         "--optimizer.lr=1e-2", "--lora.rank=4", ALL_TARGETS, "--checkpoint.enable",
         "--checkpoint.last_save_in_hf"]
    )  # fmt: skip
    trainer = Trainer(config)
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))
    try:
        (model,) = trainer.model_parts
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        trainer.train()
        want = logits(model, tokens)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        trainer.close()
    # 2 layers × 7 projections × (A, B): only they are trainable and optimised.
    assert len(trainable) == 28 and all(map(is_adapter, trainable))
    assert optimised == {id(p) for n, p in model.named_parameters() if n in trainable}
    adapter, original = (
        HFStateDictAdapter(trainer.model_config),
        load_file(folder / "model.safetensors"),
    )
    base = {k: v for k, v in state.items() if not is_adapter(k)}
    assert all(torch.equal(v, original[adapter.hf_keys(k)[0]]) for k, v in base.items())
    assert all(state[k].abs().max() > 0 for k in trainable if k.endswith("lora_b"))

    exported = transformers.AutoModelForCausalLM.from_pretrained(run / "checkpoint/step-3-hf")
    assert (logits(exported, tokens) - want).abs().max() <= LOGITS_ATOL
    # Without the merge the export would be the base: the adapters moved the logits by far more.
    base_model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert (logits(base_model, tokens) - want).abs().max() > 100 * LOGITS_ATOL
    # tetrad convert of the run's (full) checkpoint merges alike: the same tensors.
    tetrad(["convert", str(run / "checkpoint/step-3"), str(tmp_path / "converted")])
    got = load_file(tmp_path / "converted/model.safetensors")
    want_tensors = load_file(run / "checkpoint/step-3-hf/model.safetensors")
    assert got.keys() == want_tensors.keys()
    assert all(torch.equal(got[k], want_tensors[k]) for k in got)


def test_pretrained_base_then_adapters_only_resume_exactly(tmp_path: Path) -> None:
    """Pre-training's checkpoint (here a seed checkpoint of another seed, so the base cannot
    come from this run's initialisation) as --checkpoint.initial_load_path; adapters-only
    checkpoints; a run resumed from step 2 takes its base from there again and continues bit
    for bit; `tetrad convert` refuses an adapters-only checkpoint in one line."""
    pretrain = tmp_path / "pretrain"
    train(*TINY_RUN, f"--job.dump_folder={pretrain}", "--checkpoint.enable",
          "--checkpoint.create_seed_checkpoint", "--debug.seed=7")  # fmt: skip
    lora = [*TINY_RUN, f"--checkpoint.initial_load_path={step_dir(pretrain, 0)}",
            "--checkpoint.enable", "--checkpoint.interval=2", "--lora.rank=4", ALL_TARGETS,
            "--lora.save_adapters_only", "--optimizer.lr=1e-2"]  # fmt: skip
    full = train(*lora, f"--job.dump_folder={tmp_path / 'full'}")
    pretrained = model_weights(step_dir(pretrain, 0))
    assert pretrained.keys() == {k for k in full if not is_adapter(k)}
    assert all(torch.equal(full[k], pretrained[k]) for k in pretrained)

    saved = metadata(step_dir(tmp_path / "full", 2)).state_dict_metadata
    params = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    moments = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in saved if k.endswith(".exp_avg")}
    assert len(params) == 28 and all(map(is_adapter, params)) and moments == params

    resumed = tmp_path / "resumed"
    shutil.copytree(step_dir(tmp_path / "full", 2), step_dir(resumed, 2))
    state = train(*lora, f"--job.dump_folder={resumed}")
    assert [r["loss"] for r in read_metrics(resumed)] == [
        r["loss"] for r in read_metrics(tmp_path / "full") if r["step"] > 2
    ]
    assert state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in full)

    with pytest.raises(SystemExit) as exit_info:
        tetrad(["convert", str(step_dir(resumed, 4)), str(tmp_path / "hf")])
    assert exit_info.value.code == 2 and not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parallelism.tp=2"], "--lora.rank > 0 does not support --parallelism.tp > 1"),
        (["--lora.targets=q,wq"], "--lora.targets: 'wq' is not one of: q, k, v, o, gate"),
        (["--lora.targets=q,q"], "--lora.targets must name each projection once"),
        (["--float8.enable"], "--lora.rank > 0 does not support --float8.enable"),
        (
            ["--lora.dropout=0.1", "--activation_checkpoint.mode=full"],
            "would recompute with other dropout masks",
        ),
    ],
)
def test_bad_lora_options_are_one_line(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_config(load_config(["--lora.rank=4", *args]))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_architecture_is_one_line(tmp_path: Path) -> None:
    folder = make_tiny.make_tiny_hf_model(tmp_path / "gpt2", "gpt2")
    config = load_config([*HF_RUN, f"--model.hf_path={folder}", "--lora.rank=4",
                          f"--job.dump_folder={tmp_path / 'run'}"])  # fmt: skip
    try:
        with pytest.raises(ConfigError, match="does not know the projections of GPT2LMHeadModel"):
            Trainer(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _counted_flops(trainer: Trainer, tokens: torch.Tensor) -> int:
    """FLOPs of one forward and backward as torch's FlopCounterMode counts them, run."""
    (model,) = trainer.model_parts
    with FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    return int(counter.get_total_flops())


def test_flops_per_token_counts_what_lora_computes(tmp_path: Path) -> None:
    """MFU's numerator: the FLOPs LoRA saves (frozen weights' gradients) against a count of the
    matmuls actually run, dense minus LoRA, within 3% (the first block's input gradient, which
    nothing needs under a frozen embedding, is the only thing the formula does not know)."""
    tokens = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(0))
    counted, formula = {}, {}
    for name, extra in {"dense": [], "lora": ["--lora.rank=4", ALL_TARGETS]}.items():
        config = load_config([*TINY_RUN, f"--job.dump_folder={tmp_path / name}", *extra])
        trainer = Trainer(config)
        try:
            counted[name] = _counted_flops(trainer, tokens)
            formula[name] = trainer.flops_per_token * tokens.numel()
        finally:
            trainer.close()
    saved, predicted = counted["dense"] - counted["lora"], formula["dense"] - formula["lora"]
    assert predicted > 0.2 * formula["dense"]
    assert saved == pytest.approx(predicted, rel=0.03)
