"""--comm.train_timeout_seconds reaches every process group: the meshes' and the others (the async
checkpoint's own group had gloo's 30-minute default before)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tetrad.distributed.init import init_distributed, set_collective_timeout


def test_training_timeout_applies_to_every_group() -> None:
    init_distributed(300)  # one rank, outside torchrun
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        dist.new_group(backend="gloo")  # as CheckpointManager does for async saves
        set_collective_timeout(7, [mesh])
        timeouts = {
            group.group_desc: group._get_backend(torch.device("cpu")).options._timeout
            for group in dist.distributed_c10d._world.pg_map
        }
        assert len(timeouts) >= 2  # the world (a size-1 mesh dimension reuses it), the new group
        assert set(timeouts.values()) == {datetime.timedelta(seconds=7)}, timeouts
    finally:
        dist.destroy_process_group()
