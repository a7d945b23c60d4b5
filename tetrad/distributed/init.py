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


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_capability() -> tuple[int, int] | None:
    """The CUDA compute capability of this machine's (first) GPU; None without CUDA."""
    return torch.cuda.get_device_capability() if device_type() == "cuda" else None


def init_distributed(timeout_seconds: int, *, cpu_collectives: bool = False) -> torch.device:
    """Join (or, outside torchrun, create a one-rank) process group; return this rank's device.

    A one-rank group keeps the single-process run on the same DeviceMesh code path as a
    multi-process one. The backend follows the device: nccl on CUDA, gloo on CPU. Collectives
    take tensors on this device (see ``tetrad.distributed.utils``); ``cpu_collectives`` also
    registers gloo for CPU tensors on CUDA, for FSDP's CPU offload, whose sharded gradients
    (reduced for the gradient norm) live on the host. The current CUDA device is set, which
    object collectives on nccl rely on.
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
            dist.init_process_group(backend, timeout=timeout, device_id=_device_id(device))
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    return device


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
    rank that hangs mid-run fails the job in seconds rather than after the start-up allowance."""
    timeout = datetime.timedelta(seconds=seconds)
    groups = {dist.group.WORLD} | {mesh.get_group() for mesh in meshes if mesh.ndim == 1}
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timeout, group)
