"""Process group, device and seeding: the same code path for one CPU process and many GPUs."""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_capability() -> tuple[int, int] | None:
    """The CUDA compute capability of this machine's (first) GPU; None without CUDA."""
    return torch.cuda.get_device_capability() if device_type() == "cuda" else None


def init_distributed(timeout_seconds: int) -> torch.device:
    """Join (or, outside torchrun, create a one-rank) process group; return this rank's device.

    A one-rank group keeps the single-process run on the same DeviceMesh code path as a
    multi-process one. The backend follows the device: nccl on CUDA, gloo on CPU.
    """
    backend = "nccl" if device_type() == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
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
    """Seed every generator identically on all ranks (so a meta-initialised model is identical
    to a single-process one) and, if asked, use deterministic kernels only."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def materialize_and_init(
    parts: list[nn.Module],
    build_reference: Callable[[], nn.Module],
    *,
    device: torch.device,
    seed: int,
    sharded: bool,
) -> None:
    """Allocate meta-built (possibly parallelized) model parts on ``device`` and initialise them
    so that their weights equal a single-process build's under the same seed, whatever the
    layout. ``parts`` are the whole model, or this rank's pipeline stages (each the full model
    with what the stage does not own deleted, so FQNs are the full model's).

    DTensor's sharded RNG cannot promise that (on CPU meshes it even repeats one shard's values
    on every rank), so a parallelized model is initialised as a full replica on the CPU and
    each rank keeps its own shards. The replica costs one full fp32 copy in host memory: start
    models too large for that from a seed checkpoint or pretrained weights instead.
    """
    for part in parts:
        part.to_empty(device=device)
    torch.manual_seed(seed)
    if not sharded:
        (model,) = parts
        with torch.no_grad():
            model.init_weights(buffer_device=device)
        return
    with torch.device("meta"):
        reference = build_reference()
    reference.to_empty(device="cpu")
    with torch.no_grad():
        reference.init_weights()
    state = reference.state_dict()
    for part in parts:
        with torch.no_grad():
            for name, buffer in reference.named_buffers():  # non-persistent ones (rotary tables)
                part.get_buffer(name).copy_(buffer)
        # A pipeline stage holds a subset of the full model's keys.
        set_model_state_dict(
            part, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )


def materialize_for_loading(parts: list[nn.Module], device: torch.device) -> None:
    """Allocate meta-built model parts for weights that a checkpoint will fill: no
    initialisation, only the buffers no checkpoint holds (rotary tables) and re-tied
    embeddings, which ``to_empty`` unties."""
    for part in parts:
        part.to_empty(device=device)
        part.init_buffers(device)


def set_collective_timeout(seconds: int, meshes: Iterable[DeviceMesh]) -> None:
    """Switch every process group from the generous start-up timeout to the training one, so a
    rank that hangs mid-run fails the job in seconds rather than after the start-up allowance."""
    timeout = datetime.timedelta(seconds=seconds)
    groups = {dist.group.WORLD} | {mesh.get_group() for mesh in meshes if mesh.ndim == 1}
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timeout, group)
