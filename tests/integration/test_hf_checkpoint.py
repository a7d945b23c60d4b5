"""Hugging Face format end to end: a trained model exported (at the end of a run and by
`tetrad convert`) loads in transformers with tetrad's logits; HF weights imported give
transformers' logits and loss; bad input is a one-line error that writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import REPO, TINY_RUN, read_metrics, run_train
from tests.integration.test_checkpoint import load_model_state, tiny_model
from tetrad.cli import main as tetrad
from tetrad.components.hf_checkpoint import load_hf_weights
from tetrad.config.job_config import DataConfig
from tetrad.data import build_chat_encoder, build_dataloader, build_tokenizer
from tetrad.data.chat import conversation
from tetrad.models.llama3 import Llama3StateDictAdapter

transformers = pytest.importorskip("transformers")

LOGITS_ATOL = 1e-4  # fp32, two implementations of the same model


def random_tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))


def tetrad_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


def hf_logits(model: transformers.PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).logits


def test_trained_model_exports_to_transformers_and_converts_both_ways(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_train(
        run, *TINY_RUN, "--model.flavor=debug", "--training.steps=3", "--optimizer.lr=1e-2",
        "--checkpoint.enable", "--checkpoint.last_save_in_hf",
    )  # fmt: skip
    step3, exported = run / "checkpoint" / "step-3", run / "checkpoint" / "step-3-hf"
    trained = tiny_model(seed=0, flavor="debug")
    untrained_output = trained.output.weight.clone()
    trained.load_state_dict(load_model_state(step3, "debug"))
    assert not torch.equal(trained.output.weight, untrained_output)

    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    tokens = random_tokens(trained.config.vocab_size)
    diff = (tetrad_logits(trained, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= LOGITS_ATOL

    # The export carries the run's tokenizer: same ids as tetrad's; a text run's default
    # tokenizer has no chat template of its own.
    tokenizer, text = build_tokenizer(None), "def f(x):\n    return ζ + 1  # 🐍"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text, bos=False, eos=False)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id and hf_tokenizer.chat_template is None

    # tetrad convert, DCP → HF: the run's config.toml gives the model; same tensors as the export.
    # --data.format chat: the export carries the template a chat run renders with (ChatML here).
    converted = tmp_path / "converted-hf"
    tetrad(["convert", str(step3), str(converted), "--data.format=chat"])
    record = {"prompt": "What does json.dumps do?", "completion": "Serializes an object."}
    encoded = build_chat_encoder(DataConfig(format="chat"), tokenizer, max_tokens=512).encode(
        record
    )
    hf_chat = transformers.AutoTokenizer.from_pretrained(converted)
    assert encoded is not None
    assert hf_chat.apply_chat_template(conversation(record), return_dict=False) == encoded[0]
    want = load_file(exported / "model.safetensors")
    got = load_file(converted / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # ... and HF → DCP: the round trip gives back the trained weights bit for bit.
    back = tmp_path / "back-dcp"
    tetrad(["convert", str(converted), str(back), "--model.flavor=debug"])
    round_trip, original = load_model_state(back, "debug"), load_model_state(step3, "debug")
    assert round_trip.keys() == original.keys()
    assert all(torch.equal(round_trip[k], original[k]) for k in original)


def test_hf_weights_give_transformers_logits_and_loss(tmp_path: Path) -> None:
    """A transformers Llama saved as sharded safetensors: tetrad's forward on the imported
    weights matches transformers', and a run started from them reports transformers' loss on
    its first batch."""
    config = tiny_model(seed=0).config
    adapter = Llama3StateDictAdapter(config)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(adapter.hf_config()))
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="300KB")
    assert (src / "model.safetensors.index.json").is_file()

    model = tiny_model(seed=0)
    load_hf_weights(model, src, adapter)
    tokens = random_tokens(config.vocab_size)
    diff = (tetrad_logits(model, tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= LOGITS_ATOL

    run = tmp_path / "run"
    run_train(
        run, *TINY_RUN, "--training.steps=1", "--checkpoint.enable",
        f"--checkpoint.initial_load_path={src}", "--checkpoint.initial_load_in_hf",
    )  # fmt: skip
    loader = build_dataloader(
        DataConfig(), tokenizer=build_tokenizer(None), seq_len=64, batch_size=2, dp_rank=0,
        dp_world_size=1,
    )  # fmt: skip
    batch = next(iter(loader))
    inputs, labels = batch.inputs, batch.labels
    want = F.cross_entropy(hf_logits(hf, inputs).flatten(0, 1), labels.flatten()).item()
    assert read_metrics(run)[0]["loss"] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "{tmp}/nowhere does not exist"),
        ("not_a_checkpoint", "is neither a DCP checkpoint (.metadata) nor a Hugging Face folder"),
        (
            "other_shape",
            "does not fit the model: tok_embeddings.weight has shape (8192, 64) in the "
            "checkpoint but (8192, 256) in the model",
        ),
    ],
)
def test_convert_bad_input_is_one_line(tmp_path: Path, case: str, message: str) -> None:
    src, args = tmp_path / "nowhere", []
    if case == "not_a_checkpoint":
        src = tmp_path / "notes"
        src.mkdir()
        (src / "readme.txt").write_text("not a checkpoint")
    elif case == "other_shape":
        from tests.integration.test_checkpoint import _model_only_checkpoint

        src = tmp_path / "step-2"
        _model_only_checkpoint(src)
        args = ["--model.flavor=debug"]
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "tetrad.cli", "convert", str(src), str(dst), *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tetrad: error: ") and message.format(tmp=tmp_path) in line
    assert not dst.exists() and not dst.with_name("out.tmp").exists()
