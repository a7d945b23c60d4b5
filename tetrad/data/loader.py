"""The per-dp-rank stream of packed (inputs, labels) batches, resumable to the exact batch."""

import logging
import pickle
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any, Protocol

import datasets
from datasets.distributed import split_dataset_by_node

from tetrad.config.job_config import DataConfig
from tetrad.data.batch import Batch
from tetrad.data.chat import ChatEncoder, build_chat_encoder
from tetrad.data.holdout import Holdout
from tetrad.data.mixture import SOURCE_COLUMN, source_names
from tetrad.data.packing import TokenPacker, window_batch
from tetrad.data.sources import build_text_source
from tetrad.data.tokenizer import Tokenizer
from tetrad.errors import DataError

logger = logging.getLogger(__name__)

# Documents read and tokenized together: enough for the Rust encoder's threads to pay off, few
# enough that the first batch comes at once.
_CHUNK_DOCS = 64

Encoded = tuple[list[int], list[bool] | None]
"""One document's tokens and, per token, whether it is a target (None: all are)."""


class DocumentEncoder(Protocol):
    """Source rows → documents to pack."""

    whole_documents: bool
    """Pack each document whole into one window (conversations), or cut the stream (text)."""

    def encode_rows(self, rows: Sequence[dict[str, Any]]) -> list[Encoded | None]:
        """One entry per row, None where a row yields no document (dropped)."""
        ...


class TextEncoder:
    """Pretraining text: each row's text column as BOS + text + EOS, every token a target."""

    whole_documents = False

    def __init__(self, tokenizer: Tokenizer, text_field: str) -> None:
        self.tokenizer, self.text_field = tokenizer, text_field

    def encode_rows(self, rows: Sequence[dict[str, Any]]) -> list[Encoded | None]:
        texts = [row[self.text_field] for row in rows]
        return [(tokens, None) for tokens in self.tokenizer.encode_batch(texts)]


class TextDataLoader:
    """Yields `Batch`es of `[batch_size, seq_len]` int64, forever, for one dp rank.

    Each dp rank reads a disjoint part of the source (`split_dataset_by_node`) and tokenizes it a
    chunk of documents at a time. Every batch row has a `TokenPacker` of its own, cutting windows
    of seq_len + 1 from the documents given to that row. For each batch, rows 0..batch_size-1 in
    turn take the rank's next documents, whole, until their packer holds a full window; then one
    window is popped from each row. So consecutive documents go to different rows and a batch
    mixes several documents, while row r over successive batches is one contiguous token stream.
    Labels are the inputs shifted by one, where the next token is a target; with
    `document_mask` (always for whole-document packing) rows carry document ids
    (`tetrad.data.packing.window_batch`). An exhausted source starts a new epoch over the same
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
        encoder: DocumentEncoder,
        *,
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        document_mask: bool = False,
        pad_id: int = 0,
        holdout: Holdout | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp rank {dp_rank} is not in [0, dp world size {dp_world_size})")
        self._source = source if holdout is None else holdout.apply(source)
        self._holdout = None if holdout is None else [holdout.fraction, holdout.held_out]
        self._encoder = encoder
        self._document_mask = document_mask or encoder.whole_documents
        self._batch_size = batch_size
        self._dp_rank = dp_rank
        self._dp_world_size = dp_world_size
        # One packer per batch row: consecutive documents go to different rows, so a batch mixes
        # several documents instead of holding consecutive slices of one long file.
        self._packers = [
            TokenPacker(seq_len + 1, whole_documents=encoder.whole_documents, pad_id=pad_id)
            for _ in range(batch_size)
        ]
        self._epoch = 0
        self._chunk_state: dict[str, Any] | None = None  # source state before the current chunk
        self._chunk_consumed = 0  # documents after `_chunk_state` already in the packers
        # Mixture sources only: the documents each source gave the packers.
        self._source_names = source_names(source)
        self._source_counts = dict.fromkeys(self._source_names, 0)

    def _documents(self) -> Iterator[Encoded | None]:
        """This rank's encoded documents (None: a dropped row) from the saved position on,
        forever."""
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
                for row, document in zip(chunk, self._encoder.encode_rows(chunk), strict=True):
                    self._chunk_consumed += 1
                    if self._source_counts:
                        self._source_counts[self._source_names[row[SOURCE_COLUMN]]] += 1
                    yield document
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
                    if (document := next(documents)) is not None:
                        packer.add(*document)
            windows = [packer.pop(1)[0] for packer in self._packers]
            yield window_batch(windows, document_mask=self._document_mask)

    def overlong_counts(self) -> tuple[int, int] | None:
        """Conversations this rank truncated and dropped as longer than a window (None: not
        chat data); counted as they are encoded, up to one chunk of documents ahead."""
        encoder = self._encoder
        return (encoder.truncated, encoder.dropped) if isinstance(encoder, ChatEncoder) else None

    def state_dict(self) -> dict[str, Any]:
        """This rank's position, under a key of its own so that DCP keeps every rank's.

        Under `dp_rank_<rank>`: the epoch, the source's state before the current chunk, how many of
        that chunk's documents are already in the packers, `packers`, one packer state (tokens
        given to that row but not yet yielded) per batch row, in row order, and
        `source_counts`, the documents read per mixture source, `overlong`, the conversations
        truncated and dropped, and `holdout`, the side of validation's hash split read (a
        differently filtered stream would resume elsewhere). The source's state is pickled: its
        nesting changes as it is read, and DCP loads into the structure of a fresh loader's
        state.
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
                "overlong": pickle.dumps(self.overlong_counts()),
                "holdout": pickle.dumps(self._holdout),
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
        holdout = pickle.loads(mine["holdout"])
        if holdout != self._holdout:
            raise DataError(
                f"dataloader state was saved reading {_describe(holdout)} but this run reads "
                f"{_describe(self._holdout)}; resume with the same --validation.enable and "
                "--validation.holdout_fraction"
            )
        if (overlong := pickle.loads(mine["overlong"])) is not None:
            assert isinstance(self._encoder, ChatEncoder)
            self._encoder.truncated, self._encoder.dropped = overlong

    def source_counts(self) -> dict[str, int]:
        """Documents this rank has read from each mixture source so far, resumed exactly with the
        state; {} unless the source is a mixture (`tetrad.data.mixture`)."""
        return dict(self._source_counts)


def _describe(holdout: list[Any] | None) -> str:
    if holdout is None:
        return "the whole source"
    fraction, held_out = holdout
    return f"{'the held-out' if held_out else 'all but the held-out'} {fraction:g} of the source"


def build_dataloader(
    data: DataConfig,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    seed: int = 0,
    holdout: Holdout | None = None,
) -> TextDataLoader:
    """The loader for one dp rank over the source named by the data config (a mixture drawn
    with `seed`), or one side of its validation hold-out."""
    source, text_field = build_text_source(data, seed=seed)
    encoder: DocumentEncoder = TextEncoder(tokenizer, text_field)
    if data.format == "chat":
        encoder = build_chat_encoder(data, tokenizer, max_tokens=seq_len + 1)
    return TextDataLoader(
        source,
        encoder,
        seq_len=seq_len,
        batch_size=batch_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
        document_mask=data.document_masked,
        pad_id=tokenizer.eos_id if tokenizer.pad_id is None else tokenizer.pad_id,
        holdout=holdout,
    )
