"""The HF backend through the Trainer, in one process: pretrained weights loaded from the
folder give transformers' own loss on the first batch; after training, the exported folder
loads in transformers and computes the same logits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import REPO, TINY_RUN
from tetrad.components.hf_checkpoint import save_hf_weights
from tetrad.config import load_config
from tetrad.models.hf import HFStateDictAdapter
from tetrad.trainer import Trainer

_spec = importlib.util.spec_from_file_location("make_tiny", REPO / "scripts/make_tiny_hf_model.py")
assert _spec is not None and _spec.loader is not None
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

# The shared tiny run, its llama3 flavor aside (an HF model's folder defines the model).
RUN = [
    "--model.name=hf",
    *(arg for arg in TINY_RUN if not arg.startswith("--model.flavor")),
    "--metrics.peak_tflops=1",
]


def build_trainer(folder: Path, dump: Path, *args: str) -> Trainer:
    config = load_config([*RUN, f"--model.hf_path={folder}", f"--job.dump_folder={dump}", *args])
    return Trainer(config)


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "qwen3", "llama_tied", "gemma", "gpt2"]
)
def test_first_step_loss_equals_transformers(family: str, tmp_path: Path) -> None:
    tied = family.endswith("_tied")
    folder = make_tiny.make_tiny_hf_model(
        tmp_path / family, family.removesuffix("_tied"), seed=1, tie_word_embeddings=tied
    )
    trainer = build_trainer(folder, tmp_path / "run")
    try:
        assert trainer.model_config.init == "pretrained"
        (model,) = trainer.model_parts
        assert (model.lm_head.weight is model.embed_tokens.weight) == tied
        assert trainer.tokenizer.vocab_size == 8192  # the folder's tokenizer.json
        batch = next(iter(trainer.dataloader))
        inputs, labels = batch.inputs, batch.labels
        loss = trainer.forward_backward([batch])
    finally:
        trainer.close()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    # tetrad's labels are already the next tokens: no shift.
    want = hf(input_ids=inputs, labels=labels, shift_labels=labels).loss
    assert abs(loss.item() - want.item()) <= 1e-5, (loss.item(), want.item())


def test_export_after_training_loads_in_transformers(tmp_path: Path) -> None:
    folder = make_tiny.make_tiny_hf_model(tmp_path / "qwen3", "qwen3")
    trainer = build_trainer(folder, tmp_path / "run", "--training.steps=2")
    try:
        trainer.train()
        (model,) = trainer.model_parts
        save_hf_weights(model, tmp_path / "export", HFStateDictAdapter(trainer.model_config))
        tokens = torch.arange(128).reshape(2, 64)
        model.eval()
        with torch.no_grad():
            want = model(tokens)
    finally:
        trainer.close()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.config.num_hidden_layers == 2
    with torch.no_grad():
        got = exported(tokens).logits
    assert torch.equal(got, want)
    original = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert not torch.equal(original(tokens).logits, want)  # training changed the weights
