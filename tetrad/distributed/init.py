"""Process group, device and seeding: the same code path for one CPU process and many GPUs."""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from tetrad.distributed.hang import watch_for_abort


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_capability() -> tuple[int, int] | None:
    """The CUDA compute capability of this machine's (first) GPU; None without CUDA."""
    return torch.cuda.get_device_capability() if device_type() == "cuda" else None


def init_distributed(timeout_seconds: int, *, cpu_collectives: bool = False) -> torch.device:
    """Join (or, outside torchrun, create a one-rank) process group; return this rank's device.

    A one-rank group keeps the single-process run on the same DeviceMesh code path as a
    multi-process one. Under torchrun every rank watches for another's abort on a collective
    timeout (``tetrad.distributed.hang``). The backend follows the device: nccl on CUDA, gloo
    on CPU. Collectives take tensors on this device (see ``tetrad.distributed.utils``);
    ``cpu_collectives`` also registers gloo for CPU tensors on CUDA, for FSDP's CPU offload,
    whose sharded gradients (reduced for the gradient norm) live on the host. The current CUDA
    device is set, which object collectives on nccl rely on.
    """
    cuda = device_type() == "cuda"
    backend = ("cuda:nccl,cpu:gloo" if cpu_collectives else "nccl") if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_seconds)
        if "WORLD_SIZE" in os.environ:
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"tetrad/attempt-{restart_count()}", store)
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=_device_id(device),
            )
            watch_for_abort(store)
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return device


def restart_count() -> int:
    """Which attempt of an elastic job this is (torchrun's ``TORCHELASTIC_RESTART_COUNT``; 0
    outside torchrun). Each attempt rendezvouses under a store prefix of its own: the launcher's
    store outlives the attempt, and without it a restarted rank reads the dead attempt's
    addresses and its gloo/nccl group connects to ports that no longer answer."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def _device_id(device: torch.device) -> torch.device | None:
    # Binding nccl to the device lets it set up communicators eagerly; gloo takes none.
    return device if device.type == "cuda" else None


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed every generator identically on all ranks, for the randomness of training (weights
    draw from seeds of their own, see ``materialize``) and, if asked, use deterministic kernels
    only."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def set_collective_timeout(seconds: int, meshes: Iterable[DeviceMesh]) -> None:
    """Switch every process group from the generous start-up timeout to the training one, so a
    rank that hangs mid-run fails the job in seconds rather than after the start-up allowance:
    each mesh dimension's group and every other group created so far (the async checkpoint's
    has the 30-minute default otherwise). Groups created later keep their own timeout."""
    timeout = datetime.timedelta(seconds=seconds)
    groups = {mesh.get_group(dim) for mesh in meshes for dim in range(mesh.ndim)}
    for group in groups | set(dist.distributed_c10d._world.pg_map):
        dist.distributed_c10d._set_pg_timeout(timeout, group)
