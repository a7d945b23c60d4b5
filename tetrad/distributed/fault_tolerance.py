"""Fault-tolerant replica groups through torchft: HSDP whose replicate dimension can lose and
regain members while training goes on.

Each replica group is a job of its own (its own torchrun, its own dump folder) that shards the
model on its ordinary DeviceMesh. Across groups, torchft's Manager asks the lighthouse for a
quorum at the start of every step, averages the gradients over the groups in it (each rank with
the same rank of the other groups: their shards have the same layout) on a process group it
reconfigures as groups leave and join, and says whether the step commits. A group that joins
late or restarts after a failure takes the current weights, optimizer state, LR schedule and
train state from a live group before it takes part in a step (torchft's recovery, over HTTP), so
every group steps from identical state. The data position is not sent: each group reads its own
part of the data and keeps its own position (from its own checkpoint, or the start).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from tetrad.config.job_config import FaultToleranceConfig
from tetrad.errors import CheckpointError

logger = logging.getLogger(__name__)


def data_shard(config: FaultToleranceConfig, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """This rank's part of the data across all replica groups: (rank, world size) for the
    loader. Groups read disjoint parts, each as a dp group of its own would."""
    if not config.enable:
        return dp_rank, dp_size
    return config.replica_id * dp_size + dp_rank, config.group_count * dp_size


class ReplicaGroups:
    """This group's member of the quorum: ``start_step`` (quorum, recovery when behind),
    ``average_gradients``, ``commit``. Built on every rank of the group once the states it
    sends and receives exist (after the group's own checkpoint, if any, is loaded).

    ``states`` are what a recovering group takes from a live one, by name (the checkpoint's
    states but the data position); ``step`` is how many steps this group has taken."""

    def __init__(
        self,
        config: FaultToleranceConfig,
        *,
        device: torch.device,
        model_parts: Sequence[nn.Module],
        states: dict[str, Stateful],
        step: int,
    ) -> None:
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        # torchft logs every quorum and commit (and, on CPU, a flight-recorder warning per
        # quorum change); tetrad logs the changes that matter, torchft its errors.
        for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.config, self.model_parts, self.states = config, list(model_parts), states
        timeout = datetime.timedelta(seconds=config.timeout_seconds)
        # Same code path on both: the cross-group collectives take tensors on this device.
        pg = ProcessGroupNCCL(timeout) if device.type == "cuda" else ProcessGroupGloo(timeout)
        store_addr, store_port = self._group_store()
        self.manager = Manager(
            pg=pg,
            load_state_dict=self._load_state_dict,
            state_dict=self._state_dict,
            min_replica_size=config.min_replica_size,
            # Quorum and recovery before the forward pass: a recovering group then trains on the
            # recovered weights in the very step it joins.
            use_async_quorum=False,
            timeout=timeout,
            quorum_timeout=timeout,
            connect_timeout=timeout,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            store_addr=store_addr,
            store_port=store_port,
            lighthouse_addr=config.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE"),
            replica_id=f"tetrad_{config.replica_id}",
        )
        # A group resuming from its own checkpoint is that far along: a group further ahead in
        # the quorum still sends it the newer state.
        self.manager.load_state_dict({"step": step, "batches_committed": 0})
        self._members = 0
        logger.info(
            "fault tolerance: replica group %d of %d, lighthouse %s",
            config.replica_id, config.group_count,
            config.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE"),
        )  # fmt: skip

    def _group_store(self) -> tuple[str, int]:
        """The TCPStore through which the groups' ranks meet: torchrun's, or (one process, no
        torchrun) one of this process's own, on an address the other groups can reach."""
        if "MASTER_ADDR" in os.environ:
            return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        host = socket.gethostname()
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        return host, self._store.port

    def start_step(self) -> None:
        """Join this step's quorum; if this group is behind the quorum, load the state of a
        group that is not (train state, LR schedule, optimizer, weights) before returning."""
        behind = self.manager.current_step()
        begin = time.perf_counter()
        self.manager.start_quorum()
        members = self.manager.num_participants()
        if self.manager.current_step() != behind:
            logger.info(
                "fault tolerance: recovered step %d from a live replica group in %.2f s",
                self.manager.current_step(), time.perf_counter() - begin,
            )  # fmt: skip
        if members != self._members:
            logger.info(
                "fault tolerance: step %d with %d of %d replica groups",
                self.manager.current_step() + 1, members, self.config.group_count,
            )  # fmt: skip
            self._members = members

    def average_gradients(self) -> None:
        """Average this rank's gradient shards with the same rank of the other groups in the
        quorum: one flat buffer per dtype, on the device (the shard's size, not the model's)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for part in self.model_parts:
            for p in part.parameters():
                if p.grad is not None:
                    grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    by_dtype.setdefault(grad.dtype, []).append(grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.manager.allreduce(flat).wait()  # an error is kept for commit(), not raised
            for grad, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                grad.copy_(averaged.view_as(grad))

    def commit(self) -> bool:
        """Whether this step's averaged gradients may be applied: every rank of this group
        agrees, and enough groups took part without an error. False: skip the optimizer step;
        the step is retried in a new quorum."""
        committed = bool(self.manager.should_commit())
        if not committed:
            logger.warning(
                "fault tolerance: step %d not committed (a replica group failed or too few "
                "took part); retrying it",
                self.manager.current_step() + 1,
            )
        return committed

    def _state_dict(self) -> dict[str, Any]:
        """What a recovering group needs to be identical to this one, with this rank's shards
        as plain tensors (the receiver's layout is the same)."""
        return {name: _local(state.state_dict()) for name, state in self.states.items()}

    def _load_state_dict(self, received: dict[str, Any]) -> None:
        """Copy the received shards into this rank's own states, which keep their layout. The
        gradients go first: a fresh optimizer builds its (then overwritten) state only when no
        parameter has one."""
        for part in self.model_parts:
            for p in part.parameters():
                p.grad = None
        for name, state in self.states.items():
            own = state.state_dict()
            _fill(own, received[name], name)
            state.load_state_dict(own)

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


def _local(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}


def _fill(own: dict[str, Any], received: dict[str, Any], name: str) -> None:
    if own.keys() != received.keys():
        missing = sorted(own.keys() ^ received.keys())[:3]
        raise CheckpointError(
            f"the {name} state from the live replica group does not match this group's "
            f"(keys differ: {missing}); every replica group must run the same model and "
            "parallel layout"
        )
    with torch.no_grad():
        for key, value in received.items():
            mine = own[key]
            if isinstance(mine, torch.Tensor):
                (mine.to_local() if isinstance(mine, DTensor) else mine).copy_(value)
            else:
                own[key] = value
