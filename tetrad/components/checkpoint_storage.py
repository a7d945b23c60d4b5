"""How a checkpoint's files are written and read: DCP's file system storage, with a checksum of
every file written and a ``.metadata`` read without running code.

Each rank hashes the files it wrote itself (CRC-32, streamed, right after writing them) into a
small ``__R_crc32.json`` beside them; rank 0 folds those into the ``COMPLETE`` marker when it
finishes the checkpoint (``checkpoint_folder.write_complete``), so no rank reads another's
shards and no collective is added to a save (async saves included). DCP's own reader unpickles
``.metadata`` with ``pickle.load``, and its load planner non-tensor values with ``torch.load(...,
weights_only=False)``, either of which runs whatever a crafted file asks for; ours admit only
the classes DCP's metadata is made of, and plain values (``weights_only=True``).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    SavePlanner,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from tetrad.errors import CheckpointError
from tetrad.tools.progress import progress_bar, ticking

CRC32_SUFFIX = "crc32.json"
"""A rank's checksums of the files it wrote, ``__R_crc32.json``, until the checkpoint is marked
complete."""

_CHUNK = 8 << 20  # bytes hashed at a time: memory stays bounded whatever the shard's size


def file_crc32(path: Path) -> int:
    """CRC-32 of a file, read in chunks."""
    crc, buffer = 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


class ChecksumWriter(FileSystemWriter):
    """DCP's file system writer; each rank also records the CRC-32 of the files it wrote, and
    can say how far its writing is (``progress``, read from another thread)."""

    _prefix: str | None = None  # this rank's file names start with it, once writing began
    _total_bytes: int | None = None

    def progress(self) -> tuple[float, float | None]:
        """Bytes of this rank's files so far (a little above its tensors' bytes at the end:
        the files' framing), and its tensors' bytes."""
        if self._prefix is None:
            return 0, self._total_bytes
        written = sum(f.stat().st_size for f in Path(self.path).glob(f"{self._prefix}*.distcp"))
        return written, self._total_bytes

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self._total_bytes = sum(
            math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
            for item in plan.items
            if item.tensor_data is not None
        )
        self._prefix = plan.storage_data.prefix
        try:
            future = super().write_data(plan, planner)
        except RuntimeError as e:
            # torch.save reports a failed write (a full disk) as a stream position, the OS error
            # only in its context, which DCP loses when it gathers the ranks' failures.
            cause = e.__context__
            if isinstance(cause, OSError):
                raise cause from e
            raise
        folder = Path(self.path)
        names = sorted({result.storage_data.relative_path for result in future.wait()})
        crcs = {name: file_crc32(folder / name) for name in names}
        (folder / f"{plan.storage_data.prefix}{CRC32_SUFFIX}").write_text(json.dumps(crcs))
        return future


class SafeReader(FileSystemReader):
    """DCP's file system reader, unpickling ``.metadata`` with ``read_metadata_file``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        if metadata.storage_meta is None:  # as DCP's reader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor values (steps, learning rates, data positions)
    with ``torch.load(weights_only=True)``: plain values only, no code; anything else is a
    one-line CheckpointError naming the value."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.bytes_read = 0
        self.total_bytes: int | None = None

    def progress(self) -> tuple[float, float | None]:
        """Bytes of this rank's tensors read so far, and in all (read from another thread)."""
        return self.bytes_read, self.total_bytes

    def _bytes(self, item: ReadItem) -> int:
        assert self.metadata is not None  # set up before any plan
        stored = self.metadata.state_dict_metadata[item.storage_index.fqn]
        assert isinstance(stored, TensorStorageMetadata)  # a tensor read item
        return math.prod(item.lengths) * stored.properties.dtype.itemsize

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        self.total_bytes = sum(
            self._bytes(item) for item in plan.items if item.type == LoadItemType.TENSOR
        )
        return plan

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        super().commit_tensor(read_item, tensor)
        self.bytes_read += self._bytes(read_item)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            raise CheckpointError(
                f"{self.path}: {fqn!r} holds a pickled object other than plain values"
                f"{f' ({found[1]})' if found else ''}; tetrad runs no code from checkpoints, "
                "so it cannot load it"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def safe_load(state_dict: dict[Any, Any], path: Path, *, no_dist: bool = False) -> None:
    """``dcp.load`` of ``path`` into ``state_dict`` through ``SafeReader`` and
    ``SafeLoadPlanner``; their CheckpointError comes out as itself, not wrapped in DCP's
    CheckpointException (which would print a traceback per rank)."""
    planner = SafeLoadPlanner(path)
    try:
        with ticking(progress_bar(f"loading {path.name}"), planner.progress):
            dcp.load(state_dict, storage_reader=SafeReader(path), planner=planner, no_dist=no_dist)
    except CheckpointException as e:
        refused = [error for error, _ in e.failures.values() if isinstance(error, CheckpointError)]
        if refused:
            raise refused[0] from None
        raise


class MetadataRefused(pickle.UnpicklingError):
    """A ``.metadata`` that names something DCP's metadata never holds (crafted or corrupt)."""


_DCP = "torch.distributed.checkpoint"
_ALLOWED: dict[str, set[str]] = {
    f"{_DCP}.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    f"{_DCP}.filesystem": {"_StorageInfo"},
    "torch": {"Size"} | {k for k, v in vars(torch).items() if isinstance(v, torch.dtype)},
    "torch.serialization": {"_get_layout"},  # a lookup of torch.strided & co. by name
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}  # fmt: skip
"""Everything the ``.metadata`` of a DCP checkpoint is built from (what DCP pickles for tensors,
byte objects and their storage; read off real checkpoints of every layout)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name not in _ALLOWED.get(module, ()):
            raise MetadataRefused(
                f"its .metadata names {module}.{name}, which no DCP metadata holds: refused "
                "unread (the file is corrupt or crafted to run code)"
            )
        return super().find_class(module, name)


def read_metadata_file(path: Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file, admitting only DCP's metadata classes."""
    with path.open("rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise MetadataRefused(f"its .metadata holds a {type(metadata).__name__}, not DCP metadata")
    return metadata
