"""DTensor-aware helpers shared by the trainer: loss sums, the global gradient norm, full
tensors copied into shards, and the object collectives of checkpoint code, which also runs in
one process without a process group (``tetrad convert``).

The rule for every collective tetrad issues: the tensors it hands over live on the rank's
device (``Trainer.device``), never on the host by default, because NCCL has no CPU path (a CPU
tensor on a ``nccl``-only group fails with "No backend type associated with device type cpu").
Object collectives (``all_gather_object``, ``broadcast_object_list``) rely on the current CUDA
device, which ``init_distributed`` sets. ``tests/distributed/test_collective_devices.py`` checks
the rule on every collective of a short multi-process run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group is up (not in ``tetrad convert``'s single process)."""
    return dist.is_available() and dist.is_initialized()


def process_rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (picklable objects); ``[obj]`` without a process
    group."""
    if not is_distributed():
        return [obj]
    everyone: list[T | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone  # type: ignore[return-value]  # every slot filled


def barrier() -> None:
    """Wait for every rank; nothing to wait for without a process group."""
    if is_distributed():
        dist.barrier()


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank holds: a DTensor's local shard (FSDP, TP), a plain tensor whole."""
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


def reduce_sum(tensor: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Sum a plain tensor over the ranks of ``mesh`` (a new tensor; the input is untouched).
    ``tensor`` must be on the rank's device (see the module docstring)."""
    tensor = tensor.detach().clone()
    if mesh.size() > 1:
        dist.all_reduce(tensor, group=mesh.get_group())
    return tensor


def copy_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full (unsharded) value ``full`` into ``target``, plain or DTensor; a DTensor
    keeps only this rank's slice (``src_data_rank=None``: sliced locally, no communication)."""
    if isinstance(target, DTensor):
        local = distribute_tensor(
            full.to(target.device), target.device_mesh, target.placements, src_data_rank=None
        )
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(full)


def group_by_tensor_kind(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Plain tensors, and DTensors by mesh, in separate non-empty lists: foreach and fused
    kernels take one kind per call, TP without sequence parallel leaves the norm weights plain,
    and expert parallel's experts live on a mesh of their own."""
    groups: dict[DeviceMesh | None, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    return list(groups.values())


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    pp_mesh: DeviceMesh | None = None,
) -> torch.Tensor:
    """Clip gradients by their global L2 norm over every mesh dimension; return the norm.

    DTensor gradients (FSDP, TP, EP) reduce over their own meshes; plain gradients are whole
    on each rank. Pipeline stages hold disjoint parameters, so their squared norms are summed
    across ``pp``.
    """
    groups = group_by_tensor_kind(p for p in parameters if p.grad is not None)
    squares = []
    for group in groups:
        # Sum in float64: a float32 norm over a sparse gradient (an embedding's, most rows
        # zero) is off by up to ~1e-4 on CPU, and differently for each sharding.
        norms = [torch.linalg.vector_norm(p.grad, 2, dtype=torch.float64) for p in group]
        norm = torch.linalg.vector_norm(torch.stack(norms), 2)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total_norm = torch.stack(squares).sum().sqrt()
    if pp_mesh is not None and pp_mesh.size() > 1:
        total_norm = reduce_sum(total_norm**2, pp_mesh).sqrt()
    total_norm = total_norm.float()
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total_norm, foreach=True)
    return total_norm
