"""The per-dp-rank stream of packed (inputs, labels) batches, resumable to the exact batch."""

import logging
import pickle
from collections.abc import Iterator
from itertools import islice
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from tetrad.config.job_config import DataConfig
from tetrad.data.batch import Batch
from tetrad.data.mixture import SOURCE_COLUMN, source_names
from tetrad.data.packing import TokenPacker
from tetrad.data.sources import build_text_source
from tetrad.data.tokenizer import Tokenizer
from tetrad.errors import DataError

logger = logging.getLogger(__name__)

# Documents read and tokenized together: enough for the Rust encoder's threads to pay off, few
# enough that the first batch comes at once.
_CHUNK_DOCS = 64


class TextDataLoader:
    """Yields `Batch(inputs, labels)`, both `[batch_size, seq_len]` int64, forever, for one dp rank.

    Each dp rank reads a disjoint part of the source (`split_dataset_by_node`) and tokenizes it a
    chunk of documents at a time. Every batch row has a `TokenPacker` of its own, cutting windows
    of seq_len + 1 from the documents given to that row. For each batch, rows 0..batch_size-1 in
    turn take the rank's next documents, whole, until their packer holds a full window; then one
    window is popped from each row. So consecutive documents go to different rows and a batch
    mixes several documents, while row r over successive batches is one contiguous token stream.
    Labels are the inputs shifted by one. An exhausted source starts a new epoch over the same
    documents of this rank, in the same order.

    `state_dict()` between batches, loaded into a loader built the same way (same batch size
    included) before it is iterated, makes it yield exactly the batches this one would have yielded
    next. The state stores the source's position, not the documents: its state before the chunk
    being packed, plus how many of that chunk's documents are already in the packers (on resume
    those are re-read and skipped); and each row's packer carry, the tokens given to that row but
    not yet yielded.
    """

    def __init__(
        self,
        source: datasets.IterableDataset,
        text_field: str,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_world_size: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp rank {dp_rank} is not in [0, dp world size {dp_world_size})")
        self._source = source
        self._text_field = text_field
        self._tokenizer = tokenizer
        self._batch_size = batch_size
        self._dp_rank = dp_rank
        self._dp_world_size = dp_world_size
        # One packer per batch row: consecutive documents go to different rows, so a batch mixes
        # several documents instead of holding consecutive slices of one long file.
        self._packers = [TokenPacker(seq_len + 1) for _ in range(batch_size)]
        self._epoch = 0
        self._chunk_state: dict[str, Any] | None = None  # source state before the current chunk
        self._chunk_consumed = 0  # documents after `_chunk_state` already in the packers
        # Mixture sources only: the documents each source gave the packers.
        self._source_names = source_names(source)
        self._source_counts = dict.fromkeys(self._source_names, 0)

    def _documents(self) -> Iterator[list[int]]:
        """This rank's tokenized documents from the saved position on, forever."""
        while True:
            # A fresh split per pass, so no state loaded into an earlier one lingers. No
            # `set_epoch`: it would deal the shards out anew each epoch, and as ranks do not end
            # their epochs together, one could re-read documents another is still on.
            dataset = split_dataset_by_node(
                self._source, rank=self._dp_rank, world_size=self._dp_world_size
            )
            if self._chunk_state is not None:
                dataset.load_state_dict(self._chunk_state)
            rows = iter(dataset)
            next(islice(rows, self._chunk_consumed, self._chunk_consumed), None)  # skip packed ones
            while chunk := list(islice(rows, _CHUNK_DOCS)):
                texts = [row[self._text_field] for row in chunk]
                for row, tokens in zip(chunk, self._tokenizer.encode_batch(texts), strict=True):
                    self._chunk_consumed += 1
                    if self._source_counts:
                        self._source_counts[self._source_names[row[SOURCE_COLUMN]]] += 1
                    yield tokens
                self._chunk_state, self._chunk_consumed = dataset.state_dict(), 0
            if self._chunk_state is None and self._chunk_consumed == 0:
                raise DataError(
                    f"dp rank {self._dp_rank} of {self._dp_world_size} got no documents from the "
                    "data source; use a larger dataset or fewer data-parallel ranks"
                )
            self._epoch += 1
            self._chunk_state, self._chunk_consumed = None, 0
            logger.info(
                "dp rank %d: data source exhausted; epoch %d begins", self._dp_rank, self._epoch
            )

    def __iter__(self) -> Iterator[Batch]:
        documents = self._documents()
        while True:
            for packer in self._packers:
                while packer.num_windows == 0:
                    packer.add(next(documents))
            windows = torch.tensor(
                [p.pop(1)[0] for p in self._packers], dtype=torch.long
            )  # [B, S+1]
            yield Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())  # [B, S] each

    def state_dict(self) -> dict[str, Any]:
        """This rank's position, under a key of its own so that DCP keeps every rank's.

        Under `dp_rank_<rank>`: the epoch, the source's state before the current chunk, how many of
        that chunk's documents are already in the packers, `packers`, one `{"carry": [...]}` per
        batch row, in row order, and `source_counts`, the documents read per mixture source. The
        source's state is pickled: its nesting changes as it is read, and DCP loads into the
        structure of a fresh loader's state.
        """
        source = None if self._chunk_state is None else pickle.dumps(self._chunk_state)
        return {
            "dp_world_size": self._dp_world_size,
            f"dp_rank_{self._dp_rank}": {
                "epoch": self._epoch,
                "source": source,
                "source_consumed": self._chunk_consumed,
                # Pickled like the source state: DCP would flatten a list into one key per row and
                # silently load a shorter one into a loader with more rows.
                "packers": pickle.dumps([packer.state_dict() for packer in self._packers]),
                "source_counts": pickle.dumps(self._source_counts),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dp_world_size"] != self._dp_world_size:
            raise ValueError(
                f"dataloader state was saved with dp world size {state['dp_world_size']} but this "
                f"run has {self._dp_world_size}; resuming would repeat or skip data — resume with "
                "the same data-parallel degree, or start the data from scratch"
            )
        key = f"dp_rank_{self._dp_rank}"
        if key not in state:
            raise ValueError(f"dataloader state has no {key!r} (it has {sorted(state)})")
        mine = state[key]
        self._epoch = mine["epoch"]
        self._chunk_state = None if mine["source"] is None else pickle.loads(mine["source"])
        self._chunk_consumed = mine["source_consumed"]
        packer_states = pickle.loads(mine["packers"])
        if len(packer_states) != len(self._packers):
            raise ValueError(
                f"dataloader state was saved with local batch size {len(packer_states)} but this "
                f"run has {len(self._packers)}; resume with the same --training.local_batch_size"
            )
        for packer, packer_state in zip(self._packers, packer_states, strict=True):
            packer.load_state_dict(packer_state)
        source_counts = pickle.loads(mine["source_counts"])
        if list(source_counts) != self._source_names:
            raise DataError(
                f"dataloader state was saved with mixture sources {list(source_counts)} but this "
                f"run has {self._source_names}; resume with the same --data.mix"
            )
        self._source_counts = source_counts

    def source_counts(self) -> dict[str, int]:
        """Documents this rank has read from each mixture source so far, resumed exactly with the
        state; {} unless the source is a mixture (`tetrad.data.mixture`)."""
        return dict(self._source_counts)


def build_dataloader(
    data: DataConfig,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    seed: int = 0,
) -> TextDataLoader:
    """The loader for one dp rank over the source named by the data config (a mixture drawn
    with `seed`)."""
    source, text_field = build_text_source(data, seed=seed)
    return TextDataLoader(
        source,
        text_field,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )
