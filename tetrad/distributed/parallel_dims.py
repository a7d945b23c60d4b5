"""Parallelism degrees → one named DeviceMesh, checked against the world size."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tetrad.config.job_config import ParallelismConfig, TrainingConfig
from tetrad.errors import ConfigError

MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(kw_only=True)
class ParallelDims:
    """Degrees of each parallelism; ``dp_shard=-1`` takes whatever the others leave.

    The mesh is laid out (pp, dp_replicate, dp_shard, cp, tp): tensor parallel innermost, where
    its per-layer collectives get the fastest links, pipeline outermost, where point-to-point
    traffic tolerates the slowest.
    """

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
    ep: int = 1
    """Expert parallel, borrowed from dp_shard × cp (its ranks hold different tokens): the
    innermost ``ep / cp`` of dp_shard with all of cp. Routed experts shard over ep and, with
    FSDP, over what dp_shard leaves (``efsdp``)."""
    target_device_type: str | None = None
    """The device type the run is for when it is not this process's: the memory estimate
    rehearses a GPU run's mixed precision on CPU, under fake tensors that compute nothing.
    None: the mesh's."""

    def __post_init__(self) -> None:
        others = self.dp_replicate * self.cp * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ConfigError(
                    f"cannot fill --parallelism.dp_shard: {self._arithmetic(exclude_shard=True)}"
                    f" = {others} does not divide world size {self.world_size}"
                )
            self.dp_shard = self.world_size // others
        if others * self.dp_shard != self.world_size:
            raise ConfigError(
                f"parallelism degrees {self._arithmetic()} = {others * self.dp_shard} ≠ world size"
                f" {self.world_size}; make their product equal it (dp_shard=-1 fills the rest)"
            )
        if self.ep > 1 and (self.ep % self.cp or self.dp_shard % (self.ep // self.cp)):
            raise ConfigError(
                f"--parallelism.ep {self.ep} must be a multiple of cp {self.cp} that divides "
                f"dp_shard × cp = {self.dp_shard * self.cp}: expert parallel borrows those ranks"
            )

    @classmethod
    def from_config(cls, p: ParallelismConfig, world_size: int) -> ParallelDims:
        """The degrees --parallelism.* asks for, checked against ``world_size`` (cheap: the
        meshes are built on first use)."""
        return cls(
            dp_replicate=p.dp_replicate,
            dp_shard=p.dp_shard,
            cp=p.cp,
            tp=p.tp,
            pp=p.pp,
            ep=p.ep,
            world_size=world_size,
        )

    def _arithmetic(self, exclude_shard: bool = False) -> str:
        terms = [
            f"{name} {getattr(self, name)}"
            for name in MESH_DIM_NAMES
            if not (exclude_shard and name == "dp_shard")
        ]
        return " × ".join(terms)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches are in flight."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def model_parallel_degree(self) -> int:
        """Ranks that work on the same batch (tensor, pipeline and context parallel):
        per-device throughput divides a batch's tokens among them."""
        return self.tp * self.pp * self.cp

    @property
    def loss_parallel_degree(self) -> int:
        """Ranks whose tokens make up one loss average (data and context parallel)."""
        return self.dp * self.cp

    def grad_accumulation_steps(self, t: TrainingConfig) -> int:
        """Micro-batches per step: the global batch over local_batch_size × dp."""
        per_step = t.local_batch_size * self.dp
        global_batch = per_step if t.global_batch_size == -1 else t.global_batch_size
        if global_batch % per_step:
            raise ConfigError(
                f"--training.global_batch_size {global_batch} is not a multiple of "
                f"local_batch_size {t.local_batch_size} × dp degree {self.dp} = {per_step}"
            )
        return global_batch // per_step

    @functools.cached_property
    def meshes(self) -> dict[str, DeviceMesh]:
        """The world mesh under "world", each of its dimensions by name, and flattened views:
        dp (data loading), dp_shard_cp (FSDP shards), dp_cp (loss and gradient reductions),
        and fsdp (dp_shard_cp, with dp_replicate in front for HSDP). With expert parallel also
        ep (dp_shard's innermost ep / cp ranks × cp) and efsdp, the routed experts' FSDP mesh
        (the rest of dp_shard, with dp_replicate in front for HSDP)."""
        from tetrad.distributed.init import device_type

        world = init_device_mesh(
            device_type(),
            tuple(getattr(self, name) for name in MESH_DIM_NAMES),
            mesh_dim_names=MESH_DIM_NAMES,
        )
        meshes = {"world": world, **{name: world[name] for name in MESH_DIM_NAMES}}
        meshes["dp"] = world["dp_replicate", "dp_shard"]._flatten("dp")
        meshes["dp_shard_cp"] = world["dp_shard", "cp"]._flatten("dp_shard_cp")
        meshes["dp_cp"] = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        if self.dp_replicate == 1:
            meshes["fsdp"] = meshes["dp_shard_cp"]
        elif self.cp == 1:
            meshes["fsdp"] = world["dp_replicate", "dp_shard"]
        else:
            meshes["fsdp"] = world["dp_replicate", "dp_shard_cp"]
        if self.ep_enabled:
            in_ep = self.ep // self.cp
            split = world._unflatten(
                "dp_shard", (self.dp_shard // in_ep, in_ep), ("efsdp_shard", "ep_shard")
            )
            meshes["ep"] = split["ep_shard", "cp"]._flatten("ep")
            meshes["efsdp"] = (
                split["dp_replicate", "efsdp_shard"]
                if self.dp_replicate > 1
                else split["efsdp_shard"]
            )
        return meshes
