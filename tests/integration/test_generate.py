"""`tetrad generate` end to end: greedy decoding of a trained checkpoint gives, token for token,
what transformers' own `generate` gives on the model `tetrad convert` exported, on one process,
tensor parallel over two, and through the Hugging Face backend; bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tetrad.cli import main as tetrad
from tetrad.data import build_tokenizer

transformers = pytest.importorskip("transformers")

PROMPT = "def main("
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(
    trained_weights: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """The shared 40-step tiny checkpoint and its Hugging Face export."""
    step = trained_weights("tiny")
    hf = tmp_path_factory.mktemp("generate") / "hf"
    tetrad(["convert", str(step), str(hf)])
    return step, hf


@pytest.fixture(scope="module")
def reference(exported: tuple[Path, Path]) -> tuple[list[int], list[int]]:
    """The prompt's ids and transformers' greedy continuation of them on the export."""
    tokenizer = build_tokenizer(None)
    prompt = tokenizer.encode(PROMPT, bos=True, eos=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported[1], dtype=torch.float32)
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.eos_id,
    )
    new = out[0, len(prompt) :].tolist()
    assert len(set(new)) >= 4, f"a degenerate continuation compares little: {new}"
    return prompt, new


def _generated(out: Path) -> tuple[list[int], list[int]]:
    record = json.loads(out.read_text())
    return record["prompt_ids"], record["ids"]


GREEDY = ["--prompt", PROMPT, f"--max-new-tokens={NEW_TOKENS}", "--temperature=0"]


def test_greedy_equals_transformers_generate(
    exported: tuple[Path, Path],
    reference: tuple[list[int], list[int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "one.json"
    tetrad(["generate", f"--checkpoint={exported[0]}", *GREEDY, f"--out={out}"])
    assert _generated(out) == reference
    printed = capsys.readouterr()
    assert printed.out == build_tokenizer(None).decode(reference[1]) + "\n"
    assert f"{NEW_TOKENS} tokens in" in printed.err and "tokens/s" in printed.err

    # The export run by the Hugging Face backend, decoding through tetrad's KV cache.
    out = tmp_path / "hf.json"
    tetrad(
        ["generate", "--model.name=hf", f"--model.hf_path={exported[1]}", *GREEDY, f"--out={out}"]
    )
    assert _generated(out) == reference


@pytest.mark.slow
def test_tensor_parallel_greedy_equals_transformers_generate(
    exported: tuple[Path, Path], reference: tuple[list[int], list[int]], tmp_path: Path
) -> None:
    out = tmp_path / "tp2.json"
    cmd = [sys.executable, "-m", "tetrad.cli", "generate", "--nproc=2", "--parallelism.tp=2"]
    cmd += [f"--checkpoint={exported[0]}", *GREEDY, f"--out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _generated(out) == reference
    assert result.stdout == build_tokenizer(None).decode(reference[1]) + "\n"  # rank 0 only


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint={tmp}/nowhere", "--prompt=x"], "--checkpoint {tmp}/nowhere does not exist"),
        (["--checkpoint={step}", "--prompt= \n"], "the prompt is empty"),
        (["--prompt=x"], "nothing to generate from: give --checkpoint DIR"),
        (["--checkpoint={step}", "--prompt=x", "--top-p=0"], "--top-p must be in (0, 1]"),
        (["--checkpoint={step}", "--prompt-file={tmp}/none.txt"], "--prompt-file {tmp}/none.txt"),
        (["--checkpoint={step}", "--prompt=x", "--parallelism.pp=2"], "tensor and data parallel"),
        (
            ["--checkpoint={step}", "--prompt=x", "--max-new-tokens=600"],
            "the prompt's 2 tokens + --max-new-tokens 600 exceed the model's 512 positions",
        ),
    ],
)
def test_bad_input_is_one_line(
    args: list[str],
    message: str,
    exported: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [a.format(tmp=tmp_path, step=exported[0]) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        tetrad(["generate", *args])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("tetrad: error: ")
    assert message.format(tmp=tmp_path) in errors[0]
