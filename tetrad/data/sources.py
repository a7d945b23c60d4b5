"""Named text sources, each a streaming `datasets.IterableDataset` with a text column.

Everything is streamed so that a source of any size starts at once, and so that
`split_dataset_by_node` and `IterableDataset.state_dict()` give per-rank sharding and exact resume.

`datasets` is imported where a source is opened, not with this module: `tetrad train --nproc`
checks the local files (``check_local_files``) in the launcher, which opens no dataset and
would pay its import (~1 s) before starting the ranks.
"""

from __future__ import annotations

import logging
import os
import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tetrad.config.job_config import DataConfig
from tetrad.config.loader import mix_weights
from tetrad.data import stdlib_qa
from tetrad.data.chat import CHAT_COLUMNS
from tetrad.data.file_checks import check_start, first_bad_record
from tetrad.errors import ConfigError, DataError, NetworkError

if TYPE_CHECKING:
    from datasets import IterableDataset as Dataset

# Its JSON builder logs a failure before raising it; tetrad's one line names the file and line.
logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)

# Local file suffixes and the `datasets` builder that reads them.
_LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}


_INSTALLED_PACKAGES = ("site-packages", "dist-packages")


def default_corpus_files() -> list[Path]:
    """The standard library's own `.py` files in a fixed order: the corpus that needs no network."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    # os.walk, pruned: the installed packages under the stdlib folder outnumber it 7 to 1, and
    # globbing them costs every process a second at start-up.
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _INSTALLED_PACKAGES]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    files.sort(key=lambda path: path.relative_to(root).as_posix())
    # A fixed shuffle: in path order the stream starts with long runs of one kind of file
    # (codec tables, tests), which makes a short run's loss curve mostly about the ordering.
    random.Random(0).shuffle(files)
    return files


def _read_files(files: list[str]) -> Iterator[dict[str, str]]:
    for file in files:
        yield {"text": Path(file).read_text(encoding="utf-8", errors="replace")}


def _load_dataset(*args: Any, **kwargs: Any) -> Dataset:
    """`datasets.load_dataset`, streaming."""
    import datasets

    # It pings the hub to count downloads, local files included: an offline machine waits out a
    # DNS timeout (5 s measured here) per local source opened.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    ds: Dataset = datasets.load_dataset(*args, **kwargs, streaming=True)
    return ds


def _default_source(path: str | None, dataset_config: str | None, split: str) -> Dataset:
    import datasets

    # One shard per file, so ranks split the corpus by files and resume within a file.
    return datasets.IterableDataset.from_generator(
        _read_files,
        features=datasets.Features({"text": datasets.Value("string")}),
        gen_kwargs={"files": [str(file) for file in default_corpus_files()]},
    )


def _stdlib_qa_source(path: str | None, dataset_config: str | None, split: str) -> Dataset:
    import datasets

    # One shard per module, so ranks split the conversations by modules.
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    return datasets.IterableDataset.from_generator(
        stdlib_qa.conversations,
        features=datasets.Features({"system": datasets.Value("string"), "messages": [message]}),
        gen_kwargs={"modules": list(stdlib_qa.MODULES)},
    )


def _c4_source(path: str | None, dataset_config: str | None, split: str) -> Dataset:
    return _hub_source("allenai/c4", dataset_config or "en", split)


def _local_files(path: str) -> tuple[str, list[str]]:
    """The builder name and sorted files for a local file or a folder of one kind of file."""
    root = Path(path)
    if root.is_dir():
        files = sorted(file for file in root.rglob("*") if file.suffix in _LOCAL_BUILDERS)
    elif root.is_file():
        files = [root]
    else:
        raise DataError(f"--data.path {path!r} does not exist")
    builders = {_LOCAL_BUILDERS.get(file.suffix) for file in files}
    builder = builders.pop() if len(builders) == 1 else None
    if builder is None:
        raise DataError(
            f"--data.path {path!r} must be one file, or a folder of files of one kind, ending in "
            f"{', '.join(_LOCAL_BUILDERS)}; found suffixes {sorted({f.suffix for f in files})}"
        )
    return builder, [str(file) for file in files]


def _local_source(path: str | None, dataset_config: str | None, split: str) -> Dataset:
    if path is None:
        raise ConfigError(
            "--data.dataset 'local' needs --data.path: a json/jsonl/parquet/txt file or a folder "
            "of them"
        )
    builder, files = _local_files(path)
    check_start(files, builder)
    return _load_dataset(builder, data_files={split: files}, split=split)


def check_local_files(data: DataConfig) -> None:
    """The checks of the local data files the data config reads that need no dataset opened
    (each exists, has a known suffix, is not empty, its first record reads): what
    ``tetrad train --nproc`` checks once before it starts the ranks."""
    for builder, files in local_files(data):
        check_start(files, builder)


def local_files(data: DataConfig) -> list[tuple[str, list[str]]]:
    """(builder, files) of each local source the data config reads (--data.path, or the files
    and folders in --data.mix), for naming a bad record once reading has failed."""
    if data.mix is None:
        return [] if data.path is None else [_local_files(data.path)]
    resolved = (_resolve_in_mix(source) for source in mix_weights(data))
    return [_local_files(path) for name, path in resolved if path is not None]


def _hub_source(name: str, dataset_config: str | None, split: str) -> Dataset:
    try:
        return _load_dataset(name, dataset_config, split=split)
    except Exception as err:  # the hub client raises many types; all mean "cannot open it"
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        raise NetworkError(
            f"--data.dataset {name!r} (config {dataset_config!r}, split {split!r}) could not be "
            f"opened on the Hugging Face hub ({reason}); use a built-in source "
            f"({', '.join(map(repr, SOURCES))}) or check the name and your network"
        ) from err


SOURCES: dict[str, Callable[[str | None, str | None, str], Dataset]] = {
    "default": _default_source,
    "c4": _c4_source,
    "local": _local_source,
    "stdlib_qa": _stdlib_qa_source,
}
"""Built-in sources by name; any other name is opened on the hub. stdlib_qa: chat records
(--data.format chat) about the Python standard library, see stdlib_qa.py."""

# Built-in sources whose text column is fixed, whatever --data.text_field says.
_FIXED_TEXT_FIELDS = {"default": "text", "c4": "text"}


def _column_names(ds: Dataset) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)  # features unknown until read: look at the first row
    return [] if first is None else list(first)


def _check_chat_columns(name: str, columns: list[str]) -> str:
    """The first chat column of a --data.format chat source (whose records ChatEncoder reads)."""
    for fields in CHAT_COLUMNS:
        if set(fields) <= set(columns):
            return fields[0]
    raise DataError(
        f"dataset {name!r} has no chat columns (columns: {columns}); --data.format chat needs "
        "'messages' ([{role, content}, ...], optional 'system') or 'prompt' and 'completion'"
    )


def _open(name: str, path: str | None, data: DataConfig) -> tuple[Dataset, str]:
    """One source and its text column (under --data.format chat: 'messages' or 'prompt', the
    records' shape); `path` goes with the name "local"."""
    if name in SOURCES:
        ds = SOURCES[name](path, data.dataset_config, data.split)
    else:
        ds = _hub_source(name, data.dataset_config, data.split)
    try:  # the builders read a block of records at once: a bad record in it fails here
        columns = _column_names(ds)
    except Exception as err:  # the builders raise many kinds; all mean "cannot read it"
        where = None
        if path is not None:
            builder, files = _local_files(path)
            where = first_bad_record(files, builder, None)
        message = " ".join(str(err).split()) or type(err).__name__
        raise DataError(where or f"dataset {path or name!r} cannot be read ({message})") from err
    if data.format == "chat":
        return ds, _check_chat_columns(path or name, columns)
    text_field = _FIXED_TEXT_FIELDS.get(name, data.text_field)
    if text_field not in columns:
        raise DataError(
            f"dataset {path or name!r} has no column {text_field!r} (columns: {columns}); "
            f"pick one with --data.text_field"
        )
    return ds, text_field


def _resolve_in_mix(source: str) -> tuple[str, str | None]:
    """A --data.mix source as (name, path): a built-in name, an existing file or folder, else a hub
    name."""
    if source in SOURCES:
        return source, None
    if Path(source).exists():
        return "local", source
    if source.startswith(("/", ".", "~")) or Path(source).suffix in _LOCAL_BUILDERS:
        raise DataError(
            f"--data.mix source {source!r} is neither a built-in source "
            f"({', '.join(name for name in SOURCES if name != 'local')}) nor an existing file or "
            "folder"
        )
    return source, None


def build_text_source(data: DataConfig, *, seed: int = 0) -> tuple[Dataset, str]:
    """The streaming dataset named by the data config, and the name of its text column.

    A `path` means a local source whatever `dataset` says; a `mix` means the weighted mixture of
    its sources, drawn with `seed`.
    """
    from tetrad.data.mixture import MESSAGES_COLUMN, TEXT_COLUMN, mix_sources

    if data.mix is None:
        return _open("local" if data.path is not None else data.dataset, data.path, data)
    weights = mix_weights(data)
    resolved = {source: _resolve_in_mix(source) for source in weights}  # fail before opening any
    sources = []
    for source in weights:
        ds, field = _open(*resolved[source], data)
        sources.append(
            (source, ds, _record_columns(ds, field) if data.format == "chat" else [field])
        )
    chat = data.format == "chat"
    mixture = mix_sources(sources, list(weights.values()), seed=seed, chat=chat)
    return mixture, MESSAGES_COLUMN if chat else TEXT_COLUMN


def _record_columns(ds: Dataset, field: str) -> list[str]:
    """The columns a chat record is made of: its conversation's, and `system` where present."""
    fields = next(fields for fields in CHAT_COLUMNS if fields[0] == field)
    return [*fields, *(["system"] if "system" in _column_names(ds) else [])]
