"""The tokenizer interface the trainer sees: one HF `tokenizers` model plus its BOS/EOS/pad ids."""

from collections.abc import Sequence
from pathlib import Path

import tokenizers

from tetrad.errors import DataError, NetworkError

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer.json"
"""Byte-level BPE built on the default corpus by scripts/build_default_tokenizer.py."""

# Special-token names used by common tokenizers (ours, Llama-3, Llama-2/Mistral, Gemma, GPT-2/Qwen).
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


def _find_token(tokenizer: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


class Tokenizer:
    """Encodes documents as BOS + text + EOS, the same for every tokenizer.

    The wrapped tokenizer's own post-processing (e.g. Llama-3 adding BOS) is turned off so that
    BOS/EOS come from here once. A tokenizer without a BOS token (T5-style) starts documents with
    EOS instead.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        eos_id = _find_token(tokenizer, _EOS_NAMES)
        if eos_id is None:
            raise DataError(
                f"the tokenizer has no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                "documents could not be separated"
            )
        self._tokenizer = tokenizer
        self._eos_id = eos_id
        bos_id = _find_token(tokenizer, _BOS_NAMES)
        self._bos_id = eos_id if bos_id is None else bos_id
        self._pad_id = _find_token(tokenizer, _PAD_NAMES)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return [self._bos_id] * bos + ids + [self._eos_id] * eos

    def encode(self, text: str, *, bos: bool = True, eos: bool = True) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(
        self, texts: list[str], *, bos: bool = True, eos: bool = True
    ) -> list[list[int]]:
        """Like `encode` per text, but in parallel threads of the Rust encoder."""
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [self._wrap(encoding.ids, bos, eos) for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens left out, so that decode(encode(x)) == x."""
        return self._tokenizer.decode(list(ids))


def _load(spec: str) -> tokenizers.Tokenizer:
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"--data.tokenizer {spec!r}: the folder holds no tokenizer.json")
    if path.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust parser raises a bare Exception
            raise DataError(f"--data.tokenizer {spec!r}: invalid tokenizer.json ({err})") from err
    try:
        return tokenizers.Tokenizer.from_pretrained(spec)
    except Exception as err:  # the hub client raises many types; all mean "cannot fetch it"
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise NetworkError(
            f"--data.tokenizer {spec!r}: not a tokenizer.json file, not a folder containing one, "
            f"and not reachable on the Hugging Face hub ({reason}); pass a local path, a hub id "
            "such as meta-llama/Meta-Llama-3-8B, or omit it for the default"
        ) from err


def build_tokenizer(spec: str | None) -> Tokenizer:
    """The tokenizer named by --data.tokenizer: default, a tokenizer.json, a folder, or a hub id."""
    if spec is None or spec == "default":
        return Tokenizer(tokenizers.Tokenizer.from_file(str(DEFAULT_TOKENIZER)))
    return Tokenizer(_load(spec))
