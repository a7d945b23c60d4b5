"""Train the embedded default tokenizer: a byte-level BPE on the Python standard library's source.

    python scripts/build_default_tokenizer.py [--output tetrad/assets/tokenizer.json]

Deterministic: the same Python installation gives the same file, so the committed one can be
rebuilt and diffed. Byte-level, so any text encodes without unknown tokens and decodes back exactly.
"""

import argparse
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from tetrad.data.sources import default_corpus_files
from tetrad.data.tokenizer import DEFAULT_TOKENIZER

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]


def read_corpus(files: list[Path]) -> Iterator[str]:
    for file in tqdm(files, desc="reading stdlib sources", unit="file"):
        yield file.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(read_corpus(files), trainer=trainer, length=len(files))
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_TOKENIZER)
    args = parser.parse_args()
    tokenizer = train_tokenizer(default_corpus_files())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output), pretty=False)
    print(f"wrote {args.output} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
