"""Write a tiny Hugging Face causal LM folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template) that tetrad trains with --model.name hf, offline.

    python scripts/make_tiny_hf_model.py /tmp/tiny-qwen3 --family qwen3
    tetrad train --model.name hf --model.hf_path /tmp/tiny-qwen3 --training.seq_len 128
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tetrad" / "assets" / "tokenizer.json"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "<|end_of_text|>{% endfor %}"
)

# Small enough to train in seconds on one CPU core; two kv heads per four query heads keep
# grouped-query attention (and tp = 2 splits both evenly).
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
FAMILIES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma": "GemmaConfig",
    "gpt2": "GPT2Config",
    "qwen3_moe": "Qwen3MoeConfig",
    "mixtral": "MixtralConfig",
}
# Mixtures of experts: four experts of width 32, each token to two.
MOE = {
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 32, "norm_topk_prob": True},
    "mixtral": {"num_local_experts": 4, "intermediate_size": 32},
}


def make_tiny_hf_model(
    folder: str | Path, family: str = "llama", *, seed: int = 0, weights: bool = True, **fields: Any
) -> Path:
    """Create ``folder`` holding a random tiny ``family`` model; ``fields`` override TINY."""
    import tokenizers
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizers.Tokenizer.from_file(str(TOKENIZER)).get_vocab_size()
    config_cls = getattr(transformers, FAMILIES[family])
    extra: dict[str, Any] = {"head_dim": 16} if family in ("qwen3", "gemma", "qwen3_moe") else {}
    if family in MOE:
        extra |= {"num_experts_per_tok": 2, **MOE[family]}
    if family == "gpt2":  # no dropout, so its loss can be compared with transformers' in eval
        extra |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = config_cls(vocab_size=vocab_size, **{**TINY, **extra, **fields})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if weights:
        model.save_pretrained(folder)
    else:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    tokenizer_config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|end_of_text|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-weights", action="store_true", help="config and tokenizer only")
    args = parser.parse_args()
    folder = make_tiny_hf_model(
        args.folder, args.family, seed=args.seed, weights=not args.no_weights
    )
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
