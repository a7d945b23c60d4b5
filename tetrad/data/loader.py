"""The per-dp-rank stream of packed (inputs, labels) batches, resumable to the exact batch."""

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, Protocol

import datasets
from datasets.distributed import split_dataset_by_node

from tetrad.config.job_config import DataConfig
from tetrad.data.batch import Batch
from tetrad.data.chat import ChatEncoder, build_chat_encoder, conversation
from tetrad.data.file_checks import RecordCheck, first_bad_record
from tetrad.data.holdout import Holdout
from tetrad.data.mixture import SOURCE_COLUMN, source_names
from tetrad.data.packing import TokenPacker, window_batch
from tetrad.data.sources import build_text_source, local_files
from tetrad.data.tokenizer import Tokenizer
from tetrad.errors import CheckpointError, DataError

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
        for text in texts:
            if not isinstance(text, str):
                raise DataError(f"a record's {self.text_field!r} is {text!r}, not text")
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
        name: str = "the data source",
        find_bad_record: Callable[[], str | None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp rank {dp_rank} is not in [0, dp world size {dp_world_size})")
        self._source = source if holdout is None else holdout.apply(source)
        self._holdout = None if holdout is None else [holdout.fraction, holdout.held_out]
        self._encoder = encoder
        self._name, self._find_bad_record = name, find_bad_record
        self._window = seq_len + 1
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
            whole_pass, tokens = self._chunk_state is None and self._chunk_consumed == 0, 0
            rows = iter(dataset)
            next(islice(rows, self._chunk_consumed, self._chunk_consumed), None)  # skip packed ones
            while read := self._read_chunk(rows):
                chunk, encoded = read
                for row, document in zip(chunk, encoded, strict=True):
                    self._chunk_consumed += 1
                    if self._source_counts:
                        self._source_counts[self._source_names[row[SOURCE_COLUMN]]] += 1
                    tokens += 0 if document is None else len(document[0])
                    yield document
                self._chunk_state, self._chunk_consumed = dataset.state_dict(), 0
            if self._chunk_state is None and self._chunk_consumed == 0:
                raise DataError(
                    f"dp rank {self._dp_rank} of {self._dp_world_size} got no documents from "
                    f"{self._name}; use a larger dataset or fewer data-parallel ranks"
                )
            if whole_pass and tokens < self._window:
                raise DataError(
                    f"{self._name} holds {tokens} tokens for dp rank {self._dp_rank} of "
                    f"{self._dp_world_size}, fewer than one sequence (--training.seq_len + 1 = "
                    f"{self._window}); use more data, a shorter --training.seq_len or fewer "
                    "data-parallel ranks"
                )
            self._epoch += 1
            self._chunk_state, self._chunk_consumed = None, 0
            logger.info(
                "dp rank %d: data source exhausted; epoch %d begins", self._dp_rank, self._epoch
            )

    def _read_chunk(
        self, rows: Iterator[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[Encoded | None]] | None:
        """The next chunk of rows and their documents (None: the pass is over); a row that
        cannot be read or encoded is a DataError naming the file and record where known."""
        try:
            chunk = list(islice(rows, _CHUNK_DOCS))
            return (chunk, self._encoder.encode_rows(chunk)) if chunk else None
        except Exception as err:  # the `datasets` builders raise many kinds for a bad record
            where = self._find_bad_record() if self._find_bad_record else None
            if where is None and isinstance(err, DataError):
                raise
            message = " ".join(str(err).split()) or type(err).__name__
            raise DataError(where or f"reading {self._name} failed: {message}") from err

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
        differently filtered stream would resume elsewhere). The source's state is a JSON
        string: its nesting changes as it is read, and DCP loads into the structure of a fresh
        loader's state. The others are JSON too: DCP would flatten a list into one key per row
        and silently load a shorter one into a loader with more rows. JSON, not pickle: a
        checkpoint is a file from anywhere, and loading it must not run code.
        """
        overlong = self.overlong_counts()
        return {
            "dp_world_size": self._dp_world_size,
            f"dp_rank_{self._dp_rank}": {
                "epoch": self._epoch,
                "source": _to_json(self._chunk_state),
                "source_consumed": self._chunk_consumed,
                "packers": _to_json([packer.state_dict() for packer in self._packers]),
                "source_counts": _to_json(self._source_counts),
                "overlong": _to_json(None if overlong is None else list(overlong)),
                "holdout": _to_json(self._holdout),
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
        self._chunk_state = _from_json(mine["source"])
        self._chunk_consumed = mine["source_consumed"]
        packer_states = _from_json(mine["packers"])
        if len(packer_states) != len(self._packers):
            raise ValueError(
                f"dataloader state was saved with local batch size {len(packer_states)} but this "
                f"run has {len(self._packers)}; resume with the same --training.local_batch_size"
            )
        for packer, packer_state in zip(self._packers, packer_states, strict=True):
            packer.load_state_dict(packer_state)
        source_counts = _from_json(mine["source_counts"])
        if list(source_counts) != self._source_names:
            raise DataError(
                f"dataloader state was saved with mixture sources {list(source_counts)} but this "
                f"run has {self._source_names}; resume with the same --data.mix"
            )
        self._source_counts = source_counts
        holdout = _from_json(mine["holdout"])
        if holdout != self._holdout:
            raise DataError(
                f"dataloader state was saved reading {_describe(holdout)} but this run reads "
                f"{_describe(self._holdout)}; resume with the same --validation.enable and "
                "--validation.holdout_fraction"
            )
        if (overlong := _from_json(mine["overlong"])) is not None:
            assert isinstance(self._encoder, ChatEncoder)
            self._encoder.truncated, self._encoder.dropped = overlong

    def source_counts(self) -> dict[str, int]:
        """Documents this rank has read from each mixture source so far, resumed exactly with the
        state; {} unless the source is a mixture (`tetrad.data.mixture`)."""
        return dict(self._source_counts)


def _to_json(value: Any) -> str:
    """``value`` as JSON, refusing what JSON would silently change (tuples, non-string keys),
    which would resume elsewhere."""
    text = json.dumps(value)
    if json.loads(text) != value:
        raise TypeError(f"dataloader state does not round-trip through JSON: {value!r}")
    return text


def _from_json(text: Any) -> Any:
    if not isinstance(text, str):
        raise CheckpointError(
            "the checkpoint's dataloader state is not JSON (an older tetrad pickled it, and "
            "pickles from files are not loaded); resume with --checkpoint.exclude_from_loading "
            "dataloader to restart the data from its beginning"
        )
    return json.loads(text)


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
    files = local_files(data)

    def find_bad_record() -> str | None:
        check = _record_check(data)
        return next(filter(None, (first_bad_record(f, b, check) for b, f in files)), None)

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
        name=_source_name(data),
        find_bad_record=find_bad_record if files else None,
    )


def _source_name(data: DataConfig) -> str:
    if data.mix is not None:
        return f"--data.mix {data.mix!r}"
    return f"--data.path {data.path!r}" if data.path else f"--data.dataset {data.dataset!r}"


def _record_check(data: DataConfig) -> RecordCheck:
    """What makes a record unusable for the format: a chat record ChatEncoder refuses, a text
    record without a string in its text field."""

    def check(record: dict[str, Any]) -> str | None:
        if data.format == "chat":
            try:
                conversation(record)
            except DataError as err:
                return str(err)
            return None
        text = record.get(data.text_field)
        return None if isinstance(text, str) else f"{data.text_field!r} is {text!r}, not text"

    return check
