"""Data pipeline: default tokenizer, packing, rank sharding, exact resume, error messages."""

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import pytest
import torch
import torch.distributed.checkpoint as dcp

from tetrad.config.job_config import DataConfig
from tetrad.data import (
    Batch,
    TextDataLoader,
    Tokenizer,
    TokenPacker,
    build_dataloader,
    build_text_source,
    build_tokenizer,
)
from tetrad.data.loader import TextEncoder
from tetrad.data.sources import default_corpus_files
from tetrad.data.tokenizer import DEFAULT_TOKENIZER
from tetrad.errors import ConfigError, DataError, NetworkError

# DCP warns when it saves and loads in a single process, which is what these tests mean.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_tokenizer(None)


@pytest.fixture(scope="module")
def default_source() -> datasets.IterableDataset:
    source, text_field = build_text_source(DataConfig(text_field="ignored"))
    assert text_field == "text"
    return source


def _texts(n: int) -> list[str]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζῆτα", "数据", "def", "return", "🐍"]
    return [f"doc {i}: " + " ".join(rng.choices(words, k=rng.randint(1, 12))) for i in range(n)]


def _write(path: Path, texts: list[str], field: str = "text") -> Path:
    """One document per row (per line for .txt), in the format the suffix names."""
    if path.suffix == ".jsonl":
        rows = (json.dumps({field: text, "id": i}) for i, text in enumerate(texts))
        path.write_text("".join(row + "\n" for row in rows))
    elif path.suffix == ".parquet":
        datasets.Dataset.from_dict({field: texts}).to_parquet(str(path))
    else:
        path.write_text("".join(text + "\n" for text in texts))
    return path


def _local_source(path: Path) -> datasets.IterableDataset:
    source, _ = build_text_source(DataConfig(path=str(path)))
    return source


def _loader(
    source: datasets.IterableDataset,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_world_size: int = 1,
) -> TextDataLoader:
    return TextDataLoader(
        source,
        TextEncoder(tokenizer, "text"),
        seq_len=seq_len,
        batch_size=batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )


def _take(batches: Iterator[Batch], n: int) -> list[Batch]:
    return [next(batches) for _ in range(n)]


def _rows(batches: list[Batch]) -> list[list[int]]:
    """Each batch row's own token stream: its windows (inputs + the last label) batch after batch."""
    return torch.cat(
        [torch.cat([b.inputs, b.labels[:, -1:]], dim=1) for b in batches], dim=1
    ).tolist()


def _split_at_bos(stream: list[int], tokenizer: Tokenizer) -> list[list[int]]:
    """The stream cut before each BOS; it must begin with one."""
    starts = [i for i, token in enumerate(stream) if token == tokenizer.bos_id]
    assert starts and starts[0] == 0, "a row's stream should begin with a document's BOS"
    return [stream[a:b] for a, b in zip(starts, [*starts[1:], len(stream)], strict=True)]


def test_default_tokenizer(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 8192
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    assert None not in special and len(special) == 3
    text = 'def café(x: str) -> str:\n\t"""Ünïcödé → 🐍 中文"""\r\n    return x  # done\n'
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, bos=False, eos=False) == ids[1:-1]
    assert tokenizer.encode_batch([text, "x = 1"]) == [ids, tokenizer.encode("x = 1")]
    source = default_corpus_files()[0].read_text()
    assert len(tokenizer.encode(source)) < len(source) / 3, "the BPE should compress Python source"


def test_tokenizer_from_file_and_folder(tokenizer: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(DEFAULT_TOKENIZER.read_bytes())
    for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
        loaded = build_tokenizer(spec)
        assert loaded.vocab_size == tokenizer.vocab_size
        assert loaded.encode("import os") == tokenizer.encode("import os")


def test_packer_loses_and_duplicates_nothing() -> None:
    rng = random.Random(0)
    documents = [[rng.randrange(100) for _ in range(rng.randint(1, 40))] for _ in range(200)]
    packer = TokenPacker(7)
    windows: list[list[int]] = []
    for document in documents:
        packer.add(document)
        windows += [window.tokens for window in packer.pop(rng.randint(0, packer.num_windows))]
    stream = [t for document in documents for t in document]
    assert all(len(window) == 7 for window in windows)
    assert [t for window in windows for t in window] == stream[: 7 * len(windows)]
    assert packer.state_dict()["carry"]["tokens"] == stream[7 * len(windows) :]
    with pytest.raises(ValueError, match="only"):
        packer.pop(packer.num_windows + 1)


def test_batches_shapes_and_labels(
    default_source: datasets.IterableDataset, tokenizer: Tokenizer
) -> None:
    batches = _take(iter(_loader(default_source, tokenizer, seq_len=32, batch_size=3)), 8)
    for batch in batches:
        inputs, labels = batch.inputs, batch.labels
        assert batch.document_ids is None
        assert inputs.shape == labels.shape == (3, 32)
        assert inputs.dtype == labels.dtype == torch.long
        assert torch.equal(labels[:, :-1], inputs[:, 1:])
    rows = _rows(batches)
    assert all(row[0] == tokenizer.bos_id for row in rows)
    first_file = default_corpus_files()[0].read_text(encoding="utf-8", errors="replace")
    assert tokenizer.decode(rows[0]).startswith(first_file[:300])


def test_rows_pack_whole_documents_in_stream_order(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Each row packs documents of its own: a row's windows, followed by what its packer still
    holds, are whole documents end to end; every document read goes to exactly one row; rows take
    them in stream order."""
    texts = _texts(100)
    documents = {tuple(ids): i for i, ids in enumerate(tokenizer.encode_batch(texts))}
    assert len(documents) == len(texts)
    source = _local_source(_write(tmp_path / "docs.jsonl", texts))
    loader = _loader(source, tokenizer, seq_len=16, batch_size=3)
    batches = _take(iter(loader), 20)
    packers = json.loads(loader.state_dict()["dp_rank_0"]["packers"])
    assert len(packers) == 3
    held = [
        [
            documents[tuple(piece)]
            for piece in _split_at_bos(row + packer["carry"]["tokens"], tokenizer)
        ]
        for row, packer in zip(_rows(batches), packers, strict=True)
    ]  # held[r]: the indices of the documents row r was given, in order
    for indices in held:
        assert indices == sorted(indices)
    dealt = sorted(i for indices in held for i in indices)
    assert dealt == list(range(len(dealt))) and len(dealt) < len(texts)  # within epoch 0
    assert [indices[0] for indices in held] == sorted(indices[0] for indices in held)
    assert held[0][0] == 0


def test_first_batch_rows_come_from_different_documents(
    default_source: datasets.IterableDataset, tokenizer: Tokenizer
) -> None:
    """The default corpus opens with long files; still, row r of the first batch is the start of
    file r, not the next slice of file 0."""
    seq_len, batch_size = 64, 4
    batch = next(iter(_loader(default_source, tokenizer, seq_len=seq_len, batch_size=batch_size)))
    files = default_corpus_files()[:batch_size]
    texts = [file.read_text(encoding="utf-8", errors="replace") for file in files]
    firsts = [ids[: seq_len + 1] for ids in tokenizer.encode_batch(texts)]
    assert all(len(ids) == seq_len + 1 for ids in firsts), "the first files should fill a window"
    assert _rows([batch]) == firsts


def _documents_seen(loader: TextDataLoader, tokenizer: Tokenizer, min_tokens: int) -> set[str]:
    """The complete documents (BOS ... EOS) in the first ~`min_tokens` tokens of the loader,
    read row by row, as each row packs documents of its own."""
    batches = iter(loader)
    taken: list[Batch] = []
    while sum(b.inputs.numel() for b in taken) < min_tokens:
        taken.append(next(batches))
    return {
        tokenizer.decode(piece[1:-1])
        for row in _rows(taken)
        for piece in _split_at_bos(row, tokenizer)
        if piece[-1] == tokenizer.eos_id
    }


@pytest.mark.parametrize("num_files", [1, 4])
def test_dp_ranks_see_disjoint_documents(
    tokenizer: Tokenizer, tmp_path: Path, num_files: int
) -> None:
    texts = _texts(40)
    for f in range(num_files):  # 1 file: ranks split by examples; 4 files: by shards (files)
        _write(tmp_path / f"part{f}.jsonl", texts[f::num_files])
    source = _local_source(tmp_path)
    all_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))

    def seen(rank: int, world_size: int) -> set[str]:
        loader = _loader(
            source, tokenizer, seq_len=16, batch_size=2, dp_rank=rank, dp_world_size=world_size
        )
        return _documents_seen(loader, tokenizer, min_tokens=2 * all_tokens)  # over 1 epoch

    rank0, rank1 = seen(0, 2), seen(1, 2)
    assert rank0 and rank1 and not rank0 & rank1
    assert rank0 | rank1 == set(texts)
    assert seen(0, 1) == set(texts)


def _check_resume(
    make_loader: Callable[[], TextDataLoader], checkpoint: Path, k: int, m: int
) -> dict[str, Any]:
    """Checks that a loader resumed from a DCP checkpoint taken after k batches yields what the
    original did next. Returns the rank's state at the checkpoint."""
    loader = make_loader()
    batches = iter(loader)
    _take(batches, k)
    (saved,) = (v for key, v in loader.state_dict().items() if key.startswith("dp_rank_"))
    dcp.save({"data": loader}, checkpoint_id=checkpoint / str(k))
    expected = _take(batches, m)
    resumed = make_loader()
    dcp.load({"data": resumed}, checkpoint_id=checkpoint / str(k))
    for batch, again in zip(expected, _take(iter(resumed), m), strict=True):
        assert torch.equal(batch.inputs, again.inputs) and torch.equal(batch.labels, again.labels)
    assert resumed.state_dict() == loader.state_dict()
    return saved


@pytest.mark.parametrize("dp", [(0, 1), (1, 2)])
def test_resume_default_corpus(
    default_source: datasets.IterableDataset,
    tokenizer: Tokenizer,
    tmp_path: Path,
    dp: tuple[int, int],
) -> None:
    def make_loader() -> TextDataLoader:
        rank, world_size = dp
        return _loader(
            default_source,
            tokenizer,
            seq_len=512,
            batch_size=8,
            dp_rank=rank,
            dp_world_size=world_size,
        )

    state = _check_resume(make_loader, tmp_path, k=100, m=5)
    assert state["source"] is not None, "the save point should lie past the first chunk"
    packers = json.loads(state["packers"])
    assert len(packers) == 8 and any(packer["carry"]["tokens"] for packer in packers)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".txt"])
def test_resume_local_files(tokenizer: Tokenizer, tmp_path: Path, suffix: str) -> None:
    source = _local_source(_write(tmp_path / f"docs{suffix}", _texts(300)))

    def make_loader() -> TextDataLoader:
        return _loader(source, tokenizer, seq_len=16, batch_size=2, dp_rank=1, dp_world_size=2)

    for k in (1, 37, 80):
        state = _check_resume(make_loader, tmp_path, k=k, m=8)
    assert state["source"] is not None, "the last save point should lie past the first chunk"


def test_resume_across_epochs(tokenizer: Tokenizer, tmp_path: Path) -> None:
    source = _local_source(_write(tmp_path / "docs.jsonl", _texts(3)))

    def make_loader() -> TextDataLoader:
        return _loader(source, tokenizer, seq_len=8, batch_size=3)

    for k in range(1, 12):  # save points before, at and after epoch ends (~3 batches per epoch)
        state = _check_resume(make_loader, tmp_path, k=k, m=6)
    assert state["epoch"] >= 3


def test_dp_world_size_mismatch_on_load(tokenizer: Tokenizer, tmp_path: Path) -> None:
    source = _local_source(_write(tmp_path / "docs.jsonl", _texts(10)))
    saved = _loader(source, tokenizer, seq_len=8, batch_size=1, dp_rank=0, dp_world_size=4)
    other = _loader(source, tokenizer, seq_len=8, batch_size=1, dp_rank=0, dp_world_size=2)
    with pytest.raises(ValueError, match="dp world size 4 but this run has 2"):
        other.load_state_dict(saved.state_dict())


def test_batch_size_mismatch_on_load(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """`load_state_dict` refuses a state with another number of rows (called directly, not via DCP)."""
    source = _local_source(_write(tmp_path / "docs.jsonl", _texts(10)))
    saved = _loader(source, tokenizer, seq_len=8, batch_size=2)
    next(iter(saved))
    for batch_size in (1, 3):
        other = _loader(source, tokenizer, seq_len=8, batch_size=batch_size)
        with pytest.raises(
            ValueError,
            match=rf"local batch size 2 but this run has {batch_size};.*--training\.local_batch_size",
        ) as info:
            other.load_state_dict(saved.state_dict())
        assert "\n" not in str(info.value)


def test_rank_without_documents_fails(tokenizer: Tokenizer, tmp_path: Path) -> None:
    source = _local_source(_write(tmp_path / "docs.jsonl", _texts(1)))
    loader = _loader(source, tokenizer, seq_len=8, batch_size=1, dp_rank=1, dp_world_size=2)
    with pytest.raises(DataError, match="dp rank 1 of 2 got no documents"):
        next(iter(loader))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs --data\.path"):
        build_text_source(DataConfig(dataset="local"))
    with pytest.raises(DataError, match="does not exist"):
        _local_source(tmp_path / "nope.jsonl")


def test_missing_text_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "docs.jsonl", _texts(3), field="content")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['content', 'id'\]\)"):
        _local_source(path)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode, so hub look-ups fail at once (both libraries read the flag at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("hub_offline")
def test_unknown_hub_dataset(tokenizer: Tokenizer) -> None:
    with pytest.raises(NetworkError, match=r"'no-such/dataset'.*'default', 'c4', 'local'") as info:
        build_dataloader(
            DataConfig(dataset="no-such/dataset"),
            tokenizer=tokenizer,
            seq_len=8,
            batch_size=1,
            dp_rank=0,
            dp_world_size=1,
        )
    assert "\n" not in str(info.value)


@pytest.mark.usefixtures("hub_offline")
def test_unknown_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match="not reachable on the Hugging Face hub") as info:
        build_tokenizer("no-such/tokenizer")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"holds no tokenizer\.json"):
        build_tokenizer(str(tmp_path))
