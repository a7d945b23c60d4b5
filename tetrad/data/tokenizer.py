"""The tokenizer interface the trainer sees: one HF `tokenizers` model plus its BOS/EOS/pad ids,
and what transformers keeps beside it (tokenizer_config.json: chat template, special tokens)."""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import tokenizers

from tetrad.errors import DataError, NetworkError

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer.json"
"""Byte-level BPE built on the default corpus by scripts/build_default_tokenizer.py."""

# Special-token names used by common tokenizers (ours, Llama-3, Llama-2/Mistral, Gemma, GPT-2/Qwen).
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "<|im_end|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
# The files of a tokenizer folder that tetrad reads: transformers' own layout.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


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

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, hf_config: Mapping[str, Any] | None = None
    ) -> None:
        eos_id = _find_token(tokenizer, _EOS_NAMES)
        if eos_id is None:
            raise DataError(
                f"the tokenizer has no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
                "documents could not be separated"
            )
        self._tokenizer = tokenizer
        self._eos_id = eos_id
        self._own_bos_id = _find_token(tokenizer, _BOS_NAMES)
        self._bos_id = eos_id if self._own_bos_id is None else self._own_bos_id
        self._pad_id = _find_token(tokenizer, _PAD_NAMES)
        self.hf_config: dict[str, Any] = dict(hf_config or {})
        """The folder's tokenizer_config.json (with a chat_template.jinja's text as
        ``chat_template``); empty for a bare tokenizer.json."""

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers` model, as loaded (its own post-processing included)."""
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own Jinja chat template (transformers' "default" one of several)."""
        template = self.hf_config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos/eos/pad/unk token texts as transformers names them (the template sees them): from
        tokenizer_config.json where it names them, else the tokens this class found."""
        found = {
            "bos_token": self._own_bos_id,
            "eos_token": self._eos_id,
            "pad_token": self._pad_id,
        }
        tokens: dict[str, str] = {}
        for name, token_id in found.items():
            text = None if token_id is None else self._tokenizer.id_to_token(token_id)
            if text is not None:
                tokens[name] = text
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if name not in self.hf_config:
                continue
            value = self.hf_config[name]
            if isinstance(value, dict):  # transformers' serialised AddedToken
                value = value.get("content")
            if isinstance(value, str):
                tokens[name] = value
            else:  # null: the tokenizer has none (e.g. Qwen's BOS)
                tokens.pop(name, None)
        return tokens

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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` (no BOS/EOS added) and each token's (start, end) characters in it."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens left out, so that decode(encode(x)) == x."""
        return self._tokenizer.decode(list(ids))


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json, its chat template replaced by chat_template.jinja where one exists
    (transformers >= 4.43 writes the template there)."""
    config: dict[str, Any] = {}
    path = folder / "tokenizer_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON ({err})") from err
    if (folder / "chat_template.jinja").is_file():
        config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return config


def _from_file(spec: str, path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust parser raises a bare Exception
        raise DataError(f"--data.tokenizer {spec!r}: invalid tokenizer.json ({err})") from err


def _hub_folder(spec: str) -> Path:
    try:
        return Path(huggingface_hub.snapshot_download(spec, allow_patterns=list(_TOKENIZER_FILES)))
    except Exception as err:  # the hub client raises many types; all mean "cannot fetch it"
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise NetworkError(
            f"--data.tokenizer {spec!r}: not a tokenizer.json file, not a folder containing one, "
            f"and not reachable on the Hugging Face hub ({reason}); pass a local path, a hub id "
            "such as meta-llama/Meta-Llama-3-8B, or omit it for the default"
        ) from err


def build_tokenizer(spec: str | None) -> Tokenizer:
    """The tokenizer named by --data.tokenizer: default, a tokenizer.json, a folder, or a hub id;
    with the tokenizer_config.json (chat template, special tokens) found beside its
    tokenizer.json."""
    if spec is None or spec == "default":
        return Tokenizer(tokenizers.Tokenizer.from_file(str(DEFAULT_TOKENIZER)))
    path = Path(spec)
    if path.is_file():
        return Tokenizer(_from_file(spec, path), read_tokenizer_config(path.parent))
    folder = path if path.is_dir() else _hub_folder(spec)
    if not (folder / "tokenizer.json").is_file():
        raise DataError(f"--data.tokenizer {spec!r}: the folder holds no tokenizer.json")
    return Tokenizer(_from_file(spec, folder / "tokenizer.json"), read_tokenizer_config(folder))


def save_tokenizer(tokenizer: Tokenizer, folder: Path, chat_template: str | None) -> None:
    """tokenizer.json and tokenizer_config.json into ``folder``, so that transformers'
    ``AutoTokenizer.from_pretrained(folder)`` loads the tokenizer with its special tokens and
    ``apply_chat_template`` renders ``chat_template`` (None: none)."""
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    config = {k: v for k, v in tokenizer.hf_config.items() if k != "chat_template"}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config |= tokenizer.special_tokens
    if chat_template is not None:
        config["chat_template"] = chat_template
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")
