"""Data parallelism on FSDP2's per-parameter machinery: FSDP, HSDP, and DDP (replicate)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import Shard

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
    experts: tuple[Sequence[nn.Module], DeviceMesh] | None = None,
) -> None:
    """Shard each block, then the root (embeddings, final norm, output) as its own group.

    A 2-D ``mesh`` (dp_replicate, dp_shard) gives HSDP: shards within a group, replicas across.

    ``experts``: expert-parallel experts modules and their FSDP mesh (efsdp), each its own
    group. Their gradients sum the tokens of the ep ranks already (the all-to-all brought them),
    so they are divided by the whole data-parallel degree, not by efsdp's size alone. They
    shard on dim 1: dim 0 is expert parallel's, and FSDP over the same dim would need strided
    shards.
    """
    offload = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    )
    if experts is not None:
        modules, experts_mesh = experts
        for module in modules:
            fully_shard(
                module,
                mesh=experts_mesh,
                mp_policy=mp_policy,
                offload_policy=offload,
                reshard_after_forward=reshard_after_forward,
                shard_placement_fn=lambda _: Shard(1),
            )
            sharded = cast(FSDPModule, module)
            sharded.set_gradient_divide_factor(float(mesh.size()))
            if experts_mesh.size(-1) > 1 and experts_mesh.device_type == "cpu":
                # A custom factor reduce-scatters with PREMUL_SUM, which gloo lacks: sum, then
                # divide. Not over one shard: torch 2.13 would divide twice there.
                sharded.set_force_sum_reduction_for_comms(True)
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
