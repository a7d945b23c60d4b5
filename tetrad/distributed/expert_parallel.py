"""Expert parallel: the routed experts of each MoE layer split over the ``ep`` ranks, which
exchange tokens by all-to-all.

The experts module's contract (``GroupedExperts``): ``forward(rows, counts)`` takes token rows
sorted by expert with ``counts`` [E] rows per expert and returns one output row per input row,
in the same order; its parameters are stacked ``[E, ...]``. Expert parallel shards them on dim 0
(rank r holds experts ``r·E/ep … (r+1)·E/ep − 1``) and wraps the forward:

- dispatch: each rank sends the rows of rank r's experts to rank r (contiguous, since the rows
  are sorted by expert) and receives, from every rank, rows for its own experts; it reorders
  them by local expert so that the local experts see ``forward(rows, local counts)``;
- combine: the inverse reorder and the all-to-all back, so each rank gets its own rows' outputs.

Both all-to-alls are autograd-aware: backward sends the rows' gradients the other way. Split
sizes are host integers, so each layer syncs with the host once per forward, as the loop over
experts already does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor


class _Exchange:
    """What one forward's combine needs from its dispatch."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.received: list[int] = []
        self.order = torch.empty(0, dtype=torch.long)


def apply_expert_parallel(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard ``experts`` (on meta) over ``ep_mesh`` in place and route its tokens there."""
    exchange = _Exchange()
    group = ep_mesh.get_group()
    ep = ep_mesh.size()

    def shard(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param, mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(param_name, nn.Parameter(sharded, param.requires_grad))

    def dispatch(
        module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, counts = inputs
        local_experts = counts.numel() // ep
        # counts_received[s, e]: rows rank s sends to this rank's expert e.
        counts_received = torch.empty_like(counts)
        dist.all_to_all_single(counts_received, counts, group=group)
        counts_received = counts_received.view(ep, local_experts)
        exchange.sent = counts.view(ep, local_experts).sum(1).tolist()  # host sync
        exchange.received = counts_received.sum(1).tolist()
        received = all_to_all_single_autograd(rows, exchange.received, exchange.sent, group)
        # Rows arrive grouped by (source rank, expert); the experts need (expert, source rank).
        block = torch.arange(counts_received.numel(), device=counts.device)
        by_expert = (block % local_experts) * ep + block // local_experts
        key = torch.repeat_interleave(by_expert, counts_received.flatten())
        exchange.order = torch.argsort(key, stable=True)
        return received[exchange.order], counts_received.sum(0)

    def combine(module: nn.Module, outputs: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        back = torch.empty_like(outputs).index_copy(0, exchange.order, outputs)
        return all_to_all_single_autograd(back, exchange.sent, exchange.received, group)

    # torch annotates both hooks as returning None; what they return replaces the inputs
    # and the output, as its docstring says.
    distribute_module(experts, ep_mesh, shard, dispatch, combine)  # type: ignore[arg-type]
