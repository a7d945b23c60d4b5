"""One CPU process standing in for any rank of a world of any size: torch's fake process
group (``torch.testing._internal.distributed.fake_pg``), whose collectives move no data and
complete at once, so meshes, FSDP and TP build exactly as they would on that rank."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """Be ``rank`` of ``world_size`` until the block ends (then the group is destroyed, so the
    next rank can start). Refuses to replace a real process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised: the dry run needs its own")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        with warnings.catch_warnings():
            # A pipeline stage lacks the modules of the others (embeddings, output), which
            # tensor parallel's plan names: parallelize_module warns once per missing entry.
            warnings.filterwarnings("ignore", message=r"(?s).*skipping this plan entry")
            yield
    finally:
        dist.destroy_process_group()
