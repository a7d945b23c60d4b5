"""Dataset mixtures (--data.mix): shares follow the weights, draws follow the seed, resume is exact,
dp ranks read disjoint documents, bad mix strings give one line."""

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from tests.unit.test_data import (
    _check_resume,
    _documents_seen,
    _rows,
    _split_at_bos,
    _texts,
    _write,
)
from tetrad.config import load_config, validate_config
from tetrad.config.job_config import DataConfig
from tetrad.data import (
    TextDataLoader,
    Tokenizer,
    build_dataloader,
    build_text_source,
    build_tokenizer,
)
from tetrad.data.mixture import SOURCE_COLUMN, source_names
from tetrad.errors import ConfigError, DataError

# DCP warns when it saves and loads in a single process, which is what these tests mean.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_tokenizer(None)


def _sources(root: Path, sizes: dict[str, int], num_files: int = 1) -> None:
    """One folder per source of `num_files` jsonl files; each document's text starts with the
    source's name, so that a document read back names where it came from."""
    for name, size in sizes.items():
        texts = [f"{name} {text}" for text in _texts(size)]
        (root / name).mkdir(parents=True)
        for f in range(num_files):
            _write(root / name / f"part{f}.jsonl", texts[f::num_files])


def _mix(root: Path, weights: dict[str, float]) -> str:
    return ",".join(f"{root / name}:{weight}" for name, weight in weights.items())


def _loader(
    mix: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, rank: int = 0, world: int = 1
) -> TextDataLoader:
    return build_dataloader(
        DataConfig(mix=mix),
        tokenizer=tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        dp_rank=rank,
        dp_world_size=world,
        seed=3,
    )


def test_shares_follow_the_weights(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Over 10k documents each source's share is within 2% of its weight, the small sources
    restarting (1000 draws of 300 documents) so that the weights hold; the loader's counts equal a
    recount of the documents in its batches and packers, by the source each one names."""
    weights = {"big": 0.6, "mid": 0.3, "small": 0.1}
    _sources(tmp_path, {"big": 7000, "mid": 1000, "small": 300})
    mix = _mix(tmp_path, weights)
    loader = _loader(mix, tokenizer, seq_len=256, batch_size=4)
    batches, taken = iter(loader), []
    while sum(loader.source_counts().values()) < 10_000:
        taken.append(next(batches))
    counts = {Path(name).name: count for name, count in loader.source_counts().items()}
    packers = json.loads(loader.state_dict()["dp_rank_0"]["packers"])
    documents = [
        tokenizer.decode(piece[1:-1])
        for row, packer in zip(_rows(taken), packers, strict=True)
        for piece in _split_at_bos(row + packer["carry"]["tokens"], tokenizer)
    ]
    assert Counter(document.split()[0] for document in documents) == counts
    total = sum(counts.values())
    shares = {name: count / total for name, count in counts.items()}
    assert all(abs(shares[name] - weight) < 0.02 for name, weight in weights.items()), shares
    assert counts["small"] > 2 * 300, "the small source should have restarted"


def test_draws_follow_the_seed(tmp_path: Path) -> None:
    _sources(tmp_path, {"a": 100, "b": 100})
    mix = _mix(tmp_path, {"a": 1, "b": 1})

    def draws(seed: int) -> list[int]:
        source, _ = build_text_source(DataConfig(mix=mix), seed=seed)
        return [row[SOURCE_COLUMN] for row in islice(source, 100)]

    assert draws(0) == draws(0) and draws(1) == draws(1)
    assert draws(0) != draws(1)


@pytest.mark.parametrize("dp", [(0, 1), (1, 2)])
def test_resume_mid_mixture(tokenizer: Tokenizer, tmp_path: Path, dp: tuple[int, int]) -> None:
    """Save points inside the first chunk, past a chunk's end, and past a source's restarts and
    the end of the mixture's epoch (the 120-document source runs out after ~240 draws)."""
    _sources(tmp_path, {"a": 120, "b": 30, "c": 8})
    mix = _mix(tmp_path, {"a": 0.5, "b": 0.3, "c": 0.2})
    rank, world = dp

    def make_loader() -> TextDataLoader:  # a fresh mixture per loader, as a resumed run builds
        return _loader(mix, tokenizer, seq_len=16, batch_size=2, rank=rank, world=world)

    states = [_check_resume(make_loader, tmp_path / "ckpt", k=k, m=8) for k in (1, 70, 230)]
    assert states[1]["source"] is not None and states[2]["epoch"] >= 1
    assert list(json.loads(states[2]["source_counts"]).values())[2] > 8  # c restarted


@pytest.mark.parametrize("num_files", [1, 2])
def test_dp_ranks_read_disjoint_documents(
    tokenizer: Tokenizer, tmp_path: Path, num_files: int
) -> None:
    """1 file per source: the ranks take turns in one stream of draws; 2 files: each rank mixes
    a file of each source. Either way no document reaches both ranks (none restarts this soon)."""
    _sources(tmp_path, {"a": 300, "b": 300}, num_files)
    mix = _mix(tmp_path, {"a": 0.7, "b": 0.3})

    def seen(rank: int) -> set[str]:
        loader = _loader(mix, tokenizer, seq_len=16, batch_size=2, rank=rank, world=2)
        return _documents_seen(loader, tokenizer, min_tokens=1000)

    rank0, rank1 = seen(0), seen(1)
    assert not rank0 & rank1
    for documents in (rank0, rank1):
        assert {document.split()[0] for document in documents} == {"a", "b"}


def test_resume_with_another_mix_fails(tokenizer: Tokenizer, tmp_path: Path) -> None:
    _sources(tmp_path, {"a": 10, "b": 10})
    saved = _loader(_mix(tmp_path, {"a": 1, "b": 1}), tokenizer, seq_len=8, batch_size=1)
    other = _loader(_mix(tmp_path, {"b": 1, "a": 1}), tokenizer, seq_len=8, batch_size=1)
    with pytest.raises(DataError, match=r"resume with the same --data\.mix") as info:
        other.load_state_dict(saved.state_dict())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"mix": "default:1,nope.jsonl:1"}, DataError, "'nope.jsonl' is neither a built-in"),
        ({"mix": "default:1,./missing:1"}, DataError, "'./missing' is neither a built-in"),
        ({"mix": "default:abc"}, ConfigError, "weight of 'default' must be a positive number"),
        ({"mix": "default:0"}, ConfigError, "must be a positive number, got '0'"),
        ({"mix": "default:-2"}, ConfigError, "must be a positive number, got '-2'"),
        ({"mix": "default:inf"}, ConfigError, "must be a positive number, got 'inf'"),
        ({"mix": "default:1,default:2"}, ConfigError, "names 'default' twice"),
        ({"mix": "default"}, ConfigError, "item 'default' is not source:weight"),
        ({"mix": ":1"}, ConfigError, "item ':1' is not source:weight"),
        ({"mix": " , "}, ConfigError, "--data.mix is empty"),
        ({"mix": "local:1"}, ConfigError, "name the local file or folder itself"),
        ({"mix": "default:1", "path": "x.jsonl"}, ConfigError, "drop --data.path"),
        ({"mix": "default:1", "dataset": "c4"}, ConfigError, "drop --data.path and --data.dataset"),
    ],
)
def test_bad_mix_is_one_line(options: dict[str, str], error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        build_text_source(DataConfig(**options))
    assert "\n" not in str(info.value)


def test_bad_mix_fails_config_validation() -> None:
    """Before any process group starts: the check runs in `validate_config`."""
    with pytest.raises(ConfigError, match="must be a positive number"):
        validate_config(load_config(["--data.mix=default:1,c4:x"]))


def test_chat_sources_of_either_shape_mix(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """A `messages` source and a `prompt`/`completion` source mix as conversations: each draw
    is its source's record as a conversation, and the chat loader packs them."""
    with (tmp_path / "messages.jsonl").open("w") as f:
        for i in range(50):
            messages = [
                {"role": "user", "content": f"m{i}?"},
                {"role": "assistant", "content": "m"},
            ]
            f.write(json.dumps({"messages": messages, "system": "be brief"}) + "\n")
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for i in range(50):
            f.write(json.dumps({"prompt": f"p{i}?", "completion": "p"}) + "\n")
    mix = f"{tmp_path / 'messages.jsonl'}:1,{tmp_path / 'pairs.jsonl'}:1"
    data = DataConfig(mix=mix, format="chat")
    source, field = build_text_source(data, seed=0)
    rows = list(islice(source, 40))
    names = source_names(source)
    for row in rows:
        want = {
            "messages.jsonl": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": row["messages"][1]["content"]},
                {"role": "assistant", "content": "m"},
            ],
            "pairs.jsonl": [
                {"role": "user", "content": row["messages"][0]["content"]},
                {"role": "assistant", "content": "p"},
            ],
        }[Path(names[row[SOURCE_COLUMN]]).name]
        assert field == "messages" and row["messages"] == want
    loader = build_dataloader(
        data, tokenizer=tokenizer, seq_len=64, batch_size=2, dp_rank=0, dp_world_size=1
    )
    batch = next(iter(loader))
    assert batch.document_ids is not None and sum(loader.source_counts().values()) > 2
