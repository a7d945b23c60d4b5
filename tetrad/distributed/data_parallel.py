"""Data parallelism on FSDP2's per-parameter machinery: FSDP, HSDP, and DDP (replicate)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def mixed_precision_policy(
    param_dtype: str, reduce_dtype: str, device_type: str
) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPUs; plain fp32 on CPU, where bf16 matmul
    is two orders of magnitude slower."""
    if device_type == "cpu":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype]
    )


def apply_fsdp(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool | None,
    cpu_offload: bool,
) -> None:
    """Shard each block, then the root (embeddings, final norm, output) as its own group.

    A 2-D ``mesh`` (dp_replicate, dp_shard) gives HSDP: shards within a group, replicas across.
    """
    offload = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    )
    for block in blocks:
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp_policy,
            offload_policy=offload,
            reshard_after_forward=reshard_after_forward,
        )
    # The root's parameters are needed again right away in backward; keep them gathered.
    fully_shard(
        model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=False
    )


def apply_ddp(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy,
) -> None:
    """Replicate parameters and all-reduce gradients per block (bucketed like FSDP groups)."""
    for block in blocks:
        replicate(block, mesh=mesh, mp_policy=mp_policy)
    replicate(model, mesh=mesh, mp_policy=mp_policy)
