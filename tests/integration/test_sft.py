"""Supervised fine-tuning end to end: the loss is the mean cross-entropy over the assistant's
tokens only (computed by hand, each conversation alone, against the packed, masked batch), and
the shipped configs/sft_debug.toml learns on held-out conversations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_RUN, read_metrics, run_train
from tetrad.config import load_config
from tetrad.trainer import Trainer

WORDS = ["the", "a", "model", "learns", "from", "data", "every", "step", "of", "training", "tokens"]


def _chatml(prompt: str, completion: str | None) -> str:
    """ChatML by hand: the whole conversation, or (completion None) its prompt."""
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text if completion is None else f"{text}{completion}<|im_end|>\n"


def test_sft_loss_is_mean_cross_entropy_over_assistant_tokens(tmp_path: Path) -> None:
    rng = random.Random(0)
    records = [
        {
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(4, 8))),
            "completion": " ".join(rng.choices(WORDS, k=rng.randint(6, 10))),
        }
        for _ in range(8)
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = load_config(
        [*TINY_RUN, "--data.format=chat", f"--data.path={data}", f"--job.dump_folder={tmp_path}"]
    )
    trainer = Trainer(config)
    try:
        encode = lambda text: trainer.tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
        conversations, targets = [], []
        for record in records:
            full = encode(_chatml(record["prompt"], record["completion"]))
            prompt = encode(_chatml(record["prompt"], None))
            assert full[: len(prompt)] == prompt
            # Precondition: one conversation per 65-token window, two never fit together.
            assert 33 <= len(full) <= 65, len(full)
            conversations.append(full)
            targets.append(range(len(prompt), len(full)))
        batch = next(iter(trainer.dataloader))
        # Rows take documents in turn; a row closes its window when the next one does not fit:
        # row 0 holds conversation 0 (1 waits in its next window), row 1 conversation 2.
        for row, index in enumerate((0, 2)):
            n = len(conversations[index])
            assert batch.inputs[row, : n - 1].tolist() == conversations[index][:-1]
        loss = trainer.forward_backward([batch]).item()

        model, total, count = trainer.model_parts[0], 0.0, 0
        with torch.no_grad():
            for index in (0, 2):
                ids = torch.tensor([conversations[index]])
                logits = model(ids)[0]  # alone, plain causal attention
                for t in targets[index]:
                    total += F.cross_entropy(logits[t - 1], ids[0, t]).item()
                    count += 1
        assert loss == pytest.approx(total / count, rel=1e-5)
    finally:
        trainer.close()


@pytest.mark.slow
def test_sft_debug_config_learns(tmp_path: Path) -> None:
    """The shipped config, shortened: the held-out conversations' loss falls."""
    run_train(
        tmp_path,
        "--config=configs/sft_debug.toml",
        "--training.steps=20",
        "--training.local_batch_size=4",
        "--validation.freq=10",
        "--metrics.log_freq=10",
    )
    val = [m["val_loss"] for m in read_metrics(tmp_path) if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0] - 0.3, val
