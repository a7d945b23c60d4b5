"""A weighted mixture of sources as one streaming dataset: each document comes from a source drawn
at random by weight, and carries that source's index, so that the loader can count shares.

`datasets.interleave_datasets` does the drawing. Its `state_dict()` holds the generator's state and
each source's position, so the mixture resumes exactly like any single source, through
`split_dataset_by_node` too (tests/unit/test_mixture.py). One catch, measured with datasets 5.2:
when ranks split the mixture by examples (sources with fewer files than ranks), two live iterators
over one mixture object share its per-source state, and the prefetching threads of one move the
other (a resumed copy then skipped 2 documents in 1 to 5 of 10 tries); so every reader builds its
own mixture, as a resumed run does.
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import datasets
from datasets import IterableDataset as Dataset

from tetrad.data.chat import conversation

SOURCE_COLUMN = "source"
"""The mixture's column of source indices, a `ClassLabel` whose names are the sources' names."""

TEXT_COLUMN = "text"
"""The mixture's text column: each source's own text column, renamed."""

MESSAGES_COLUMN = "messages"
"""A chat mixture's column: each record's conversation (``tetrad.data.chat.conversation``), so
that sources of `messages` and of `prompt`/`completion` records mix."""

_MESSAGES = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]


def _tag(row: dict[str, Any], *, field: str, index: int) -> dict[str, Any]:
    return {TEXT_COLUMN: row[field], SOURCE_COLUMN: index}


def _tag_chat(row: dict[str, Any], *, index: int) -> dict[str, Any]:
    messages = [{"role": m["role"], "content": m["content"]} for m in conversation(row)]
    return {MESSAGES_COLUMN: messages, SOURCE_COLUMN: index}


def mix_sources(
    sources: Sequence[tuple[str, Dataset, list[str]]],
    weights: Sequence[float],
    *,
    seed: int,
    chat: bool = False,
) -> Dataset:
    """The mixture of `(name, dataset, columns)` sources (text: its text column; chat: its
    record's columns), drawn with probabilities proportional to `weights` from a generator
    seeded with `seed`.

    A source that runs out restarts, so the weights hold; the mixture ends once every source has
    run out at least once (the loader then starts its next epoch, the same draws again).
    """
    names = [name for name, _, _ in sources]
    column = MESSAGES_COLUMN if chat else TEXT_COLUMN
    value = _MESSAGES if chat else datasets.Value("string")
    features = datasets.Features({column: value, SOURCE_COLUMN: datasets.ClassLabel(names=names)})
    tagged = [
        ds.select_columns(columns).map(
            partial(_tag_chat, index=index)
            if chat
            else partial(_tag, field=columns[0], index=index),
            remove_columns=columns,
            features=features,
        )
        for index, (_, ds, columns) in enumerate(sources)
    ]
    total = sum(weights)
    return datasets.interleave_datasets(
        tagged,
        probabilities=[weight / total for weight in weights],
        seed=seed,
        stopping_strategy="all_exhausted",
    )


def source_names(ds: Dataset) -> list[str]:
    """The names of a mixture's sources in index order; empty for any other dataset."""
    feature = (ds.features or {}).get(SOURCE_COLUMN)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else []


def format_shares(counts: dict[str, int]) -> str:
    """`name count (share%), ...` for a log line."""
    total = max(sum(counts.values()), 1)
    return ", ".join(f"{name} {count} ({count / total:.1%})" for name, count in counts.items())
