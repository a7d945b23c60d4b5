"""Chat data: rendering and token ids equal transformers' apply_chat_template; the target mask is
exactly the assistant's tokens; overlong and bad records; the embedded stdlib_qa dataset; the
tokenizer files a Hugging Face export carries."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import tokenizers

from tetrad.config.job_config import DataConfig
from tetrad.data import Tokenizer, build_chat_encoder, build_text_source, build_tokenizer
from tetrad.data.chat import CHATML, LLAMA3, conversation
from tetrad.data.tokenizer import DEFAULT_TOKENIZER, save_tokenizer
from tetrad.errors import DataError

transformers = pytest.importorskip("transformers")

# Qwen3's rule in small: the final assistant turn gets an (empty) think block, earlier ones do
# not, so rendering a conversation up to an earlier turn is no prefix of the whole.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.last and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ChatML with transformers' {% generation %} marks: its assistant mask is a reference for ours.
CHATML_GENERATION = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{{- m.content + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The tiny HF model's (scripts/make_tiny_hf_model.py): no generation prompt at all.
TINY = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "<|end_of_text|>{% endfor %}"
)
TEMPLATES = {
    "qwen3_like": QWEN3_LIKE,
    "chatml_generation": CHATML_GENERATION,
    "tiny": TINY,
    "chatml": CHATML,
    "llama3": LLAMA3,
}

RECORDS: list[dict[str, Any]] = [
    {
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six."},
        ],
    },
    {"prompt": "Name a prime, ζῆτα.", "completion": " Seven 🐍"},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!\nHow can I help?"},
        ]
    },
]


def tokenizer_folder(folder: Path, template: str) -> Path:
    """The default tokenizer plus ChatML's two special tokens, with ``template`` and Qwen-style
    special tokens (no BOS, EOS = <|im_end|>) in tokenizer_config.json."""
    folder.mkdir(parents=True)
    backend = tokenizers.Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
        "bos_token": "<|begin_of_text|>" if template is not QWEN3_LIKE else None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def target_runs(tokenizer: Tokenizer, ids: list[int], is_target: list[bool]) -> list[str]:
    """The decoded text of each maximal run of target tokens."""
    runs: list[list[int]] = []
    for i, (token, target) in enumerate(zip(ids, is_target, strict=True)):
        if target:
            if i == 0 or not is_target[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.backend.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_ids_equal_transformers_apply_chat_template(name: str, tmp_path: Path) -> None:
    folder = tokenizer_folder(tmp_path / name, TEMPLATES[name])
    encoder = build_chat_encoder(
        DataConfig(format="chat"), build_tokenizer(str(folder)), max_tokens=4096
    )
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for record in RECORDS:
        encoded = encoder.encode(record)
        assert encoded is not None
        ids, is_target = encoded
        want = reference.apply_chat_template(conversation(record), return_dict=False)
        assert ids == want  # exact
        assert len(is_target) == len(ids) and 0 < sum(is_target) < len(ids)
        if name == "chatml_generation":  # transformers' own assistant mask, token for token
            marked = reference.apply_chat_template(
                conversation(record), return_dict=True, return_assistant_tokens_mask=True
            )
            assert is_target == [bool(m) for m in marked["assistant_masks"]]


def test_target_mask_is_the_assistant_text(tmp_path: Path) -> None:
    """Hand-written expectations of the decoded target tokens."""
    record = RECORDS[0]
    tokenizer = build_tokenizer(str(tokenizer_folder(tmp_path / "qwen3", QWEN3_LIKE)))
    encoder = build_chat_encoder(DataConfig(format="chat"), tokenizer, max_tokens=4096)
    encoded = encoder.encode(record)
    assert encoded is not None
    assert target_runs(tokenizer, *encoded) == [
        "It is 4.<|im_end|>\n",
        "<think>\n\n</think>\n\nSix.<|im_end|>\n",
    ]
    # The default tokenizer has no ChatML tokens: the built-in template's markers are text.
    default = build_tokenizer(None)
    encoder = build_chat_encoder(DataConfig(format="chat"), default, max_tokens=4096)
    encoded = encoder.encode(RECORDS[1])
    assert encoded is not None
    assert target_runs(default, *encoded) == [" Seven 🐍<|im_end|>\n"]
    ids, _ = encoded
    assert default.backend.decode(ids) == (
        "<|im_start|>user\nName a prime, ζῆτα.<|im_end|>\n"
        "<|im_start|>assistant\n Seven 🐍<|im_end|>\n"
    )
    # train_on_prompt: every token but the first.
    encoder = build_chat_encoder(
        DataConfig(format="chat", train_on_prompt=True), default, max_tokens=4096
    )
    encoded = encoder.encode(RECORDS[1])
    assert encoded is not None and encoded[0] == ids
    assert encoded[1] == [False] + [True] * (len(ids) - 1)


def test_overlong_truncated_or_dropped_and_counted() -> None:
    tokenizer = build_tokenizer(None)
    full = build_chat_encoder(DataConfig(format="chat"), tokenizer, max_tokens=4096)
    encoded = full.encode(RECORDS[0])
    assert encoded is not None
    ids, is_target = encoded
    first_target = is_target.index(True)
    cut = first_target + 3
    truncate = build_chat_encoder(DataConfig(format="chat"), tokenizer, max_tokens=cut)
    assert truncate.encode(RECORDS[0]) == (ids[:cut], is_target[:cut])
    # Cut before the first assistant token: nothing left to learn, so dropped.
    early = build_chat_encoder(DataConfig(format="chat"), tokenizer, max_tokens=first_target)
    assert early.encode(RECORDS[0]) is None
    assert (truncate.truncated, truncate.dropped, early.truncated, early.dropped) == (1, 0, 0, 1)
    drop = build_chat_encoder(
        DataConfig(format="chat", overlong="drop"), tokenizer, max_tokens=len(ids) - 1
    )
    assert drop.encode(RECORDS[0]) is None
    exact = build_chat_encoder(
        DataConfig(format="chat", overlong="drop"), tokenizer, max_tokens=len(ids)
    )
    assert exact.encode(RECORDS[0]) == (ids, is_target)
    assert (drop.dropped, drop.truncated, exact.dropped) == (1, 0, 0)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "hello"}, "neither 'messages'"),
        ({"prompt": "only a prompt"}, "neither 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "string 'role' and 'content'"),
    ],
)
def test_bad_records_are_one_line(record: dict[str, Any], message: str) -> None:
    encoder = build_chat_encoder(DataConfig(format="chat"), build_tokenizer(None), max_tokens=64)
    with pytest.raises(DataError, match=message) as err:
        encoder.encode(record)
    assert "\n" not in str(err.value)


def test_chat_sources_check_their_columns(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[1]] * 3))
    source, field = build_text_source(DataConfig(format="chat", path=str(pairs)))
    assert field == "prompt" and list(source) == [RECORDS[1]] * 3
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match="needs 'messages'") as err:
        build_text_source(DataConfig(format="chat", path=str(texts)))
    assert "\n" not in str(err.value)


def test_stdlib_qa_is_deterministic_and_real() -> None:
    source, field = build_text_source(DataConfig(format="chat", dataset="stdlib_qa"))
    first, second = list(source), list(source)
    assert field == "messages" and first == second
    assert source.num_shards >= 32  # dp ranks split it by shards
    assert len(first) >= 2000
    questions = [record["messages"][0]["content"] for record in first]
    assert len(set(questions)) == len(questions)
    assert sum(len(record["messages"]) == 4 for record in first) >= 500  # multi-turn ones
    by_question = {record["messages"][0]["content"]: record["messages"] for record in first}
    # Answers are the docstring's first paragraph and inspect's signature, computed here anew.
    docstring = inspect.getdoc(json.dumps)
    assert docstring is not None
    doc = " ".join(docstring.split("\n\n")[0].split())
    asked = [q for q in by_question if "json.dumps" in q and "signature" not in q]
    assert len(asked) == 1 and by_question[asked[0]][1]["content"] == doc
    signature = by_question["What is the signature of json.dumps?"][1]["content"]
    assert signature == f"json.dumps{inspect.signature(json.dumps)}"
    # Most conversations fit the debug run's window (seq_len 256 + 1) whole.
    encoder = build_chat_encoder(DataConfig(format="chat"), build_tokenizer(None), max_tokens=257)
    encoded = [encoder.encode(record) for record in first[::10]]
    assert encoder.truncated + encoder.dropped <= len(encoded) // 10
    assert all(e is not None and any(e[1]) for e in encoded)


def test_exported_tokenizer_loads_in_transformers(tmp_path: Path) -> None:
    """save_tokenizer (what Hugging Face exports carry): AutoTokenizer reads the folder, its
    apply_chat_template gives the encoder's ids, and the source's special tokens survive."""
    source = tokenizer_folder(tmp_path / "source", QWEN3_LIKE)
    tokenizer = build_tokenizer(str(source))
    export = tmp_path / "export"
    export.mkdir()
    save_tokenizer(tokenizer, export, tokenizer.chat_template)
    loaded = transformers.AutoTokenizer.from_pretrained(export)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        None,
        "<|im_end|>",
        "<|pad|>",
    )
    encoder = build_chat_encoder(DataConfig(format="chat"), tokenizer, max_tokens=4096)
    for record in RECORDS:
        encoded = encoder.encode(record)
        assert encoded is not None
        assert loaded.apply_chat_template(conversation(record), return_dict=False) == encoded[0]
