"""``tetrad estimate``: a rank's peak memory in training, by component, for a config and world
size, without the memory. The rank's model is built as training builds it (``build_rank``) on a
fake process group, materialised as fake tensors (shapes and dtypes, no storage), takes one
training step, and runs the forward and backward of a second under torch's memory tracker
(``torch.distributed._tools``), which adds up the storages every op would allocate and
attributes them: parameters, gradients, optimizer states, activations, backward temporaries,
FSDP's all-gather and reduce-scatter buffers. torch.compile is left out (eager memory: compiled
blocks usually need less).

A pipeline rank runs one micro-batch through its stages (a later stage on a hidden state, a
middle one's backward from a sum) and its activations are multiplied by the micro-batches its
schedule keeps in flight (``tetrad.plan.schedules``).

``train_step`` also runs on real tensors in real processes: that is how the estimate is checked
against a measured peak (tests/distributed/test_estimate.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor.parallel import loss_parallel

from tetrad.components.loss import cross_entropy_sum
from tetrad.components.optimizer import build_optimizer
from tetrad.config import Config, ConfigError, validate_config
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.models.registry import get_model_spec
from tetrad.plan.dry_run import build_rank, tokenizer_vocab_size
from tetrad.plan.fake_world import fake_world
from tetrad.plan.schedules import SCHEDULES

GIB = 2**30

# The tracker's categories (MemTracker's and FSDPMemTracker's names) → the table's rows.
COMPONENTS = {
    "Parameter": "parameters",
    "Sharded Param": "parameters",
    "Buffer": "parameters",
    "Unsharded Param": "all-gathered parameters",
    "Gradient": "gradients",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "Optstate": "optimizer states",
    "OptState": "optimizer states",
    "Activation": "activations",
    "Temp": "backward temporaries",
    "All Gather": "communication buffers",
    "Reduce Scatter": "communication buffers",
    "Inputs": "inputs",
    "Other": "inputs",
}
ROWS = tuple(dict.fromkeys(COMPONENTS.values()))
ACMode = Literal["none", "selective", "full"]
AC_MODES: tuple[ACMode, ...] = ("none", "selective", "full")


@dataclass(frozen=True)
class RankMemory:
    """What one rank holds at its peak, by component (bytes)."""

    peak: dict[str, int]
    activations_by_ac: dict[str, int]
    """Activations at the peak under each --activation_checkpoint.mode."""

    @property
    def total(self) -> int:
        return sum(self.peak.values())


def step_peak(
    config: Config, world_size: int, *, vocab_size: int, n_layers: int | None = None
) -> dict[str, int]:
    """Peak bytes by component of a training step of the rank this process is in the current
    (fake) process group, on fake tensors: nothing allocated. ``n_layers``: of a model with
    that many blocks instead."""
    # Built as for a GPU run (its mixed precision and attention), computed on CPU tensors.
    dims, built = build_rank(config, world_size, vocab_size=vocab_size, n_layers=n_layers)
    parts = built.parts
    if any(part.moe_layers() for part in parts):
        raise ConfigError(
            f"tetrad estimate cannot run a mixture of experts ({built.model_name}) on fake "
            "tensors: its routing has data-dependent shapes; `tetrad train --dry-run` gives its "
            "per-rank parameter and optimizer-state memory"
        )
    device = torch.device("cpu")
    t = config.training
    microbatches = built.plan.microbatches if built.plan else 1
    with FakeTensorMode(allow_non_fake_inputs=True):
        for part in parts:
            part.to_empty(device=device)
            part.init_buffers(device)
        optimizer = build_optimizer(parts, config.optimizer, device)
        shape = (t.local_batch_size // microbatches, t.seq_len // dims.cp)
        labels = torch.randint(0, vocab_size, shape, device=device)
        if getattr(parts[0], "tok_embeddings", None) is not None:
            inputs = torch.randint(0, vocab_size, shape, device=device)
        elif dims.tp > 1:
            raise ConfigError(
                "tetrad estimate covers tensor parallel only on the first pipeline stage's "
                "ranks (--rank with pp coordinate 0), not yet on later stages"
            )
        else:  # a later pipeline stage: the previous one's hidden states
            inputs = torch.randn(*shape, built.model_config.dim, device=device)
        # The first step creates the optimizer states; the second one's forward and backward
        # hold them: the steady state. Its optimizer step is left out: under fake tensors the
        # tracker counts the update's short-lived temporaries as states (tens of GiB for 8B),
        # while the fused/foreach update holds little beyond the states it updates in place.
        train_step(parts, optimizer, inputs, labels, config, dims)
        tracker: MemTracker
        if dims.fsdp_enabled and len(parts) == 1:
            tracker = FSDPMemTracker(parts[0], optimizer)
            tracker.track_inputs((inputs, labels))
        else:  # FSDPMemTracker takes one FSDP root: several stages' all-gathers count as
            tracker = MemTracker()  # parameters and backward temporaries here
            tracker.track_external(*parts, optimizer, inputs, labels)
        held: list[dict[str, int]] = []  # after the forward, before the backward

        def after_forward() -> None:
            held.append(_rows(tracker.get_tracker_snapshot("current")))

        with tracker:
            forward_backward(parts, inputs, labels, config, dims, after_forward)
        peak = _rows(tracker.get_tracker_snapshot("peak"))
    if built.plan:
        # The other micro-batches its schedule keeps in flight hold what this one holds at
        # the end of its forward (its saved activations) through this one's whole step.
        in_flight = SCHEDULES[config.parallelism.pp_schedule].in_flight(dims.pp, microbatches)
        peak["activations"] += int(held[0]["activations"] * (in_flight - 1))
    return peak


def _rows(snapshot: dict[torch.device, dict[Any, int]]) -> dict[str, int]:
    """A tracker snapshot (one device) by the table's rows."""
    (by_category,) = snapshot.values()
    rows = dict.fromkeys(ROWS, 0)
    for category, size in by_category.items():
        if category != "Total":
            rows[COMPONENTS[getattr(category, "value", category)]] += size
    return rows


def forward_backward(
    parts: Sequence[nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: Config,
    dims: ParallelDims,
    after_forward: Callable[[], None] | None = None,
) -> None:
    """One micro-batch's forward, loss and backward, as the trainer runs them. A pipeline
    rank's stages run one after the other, on a hidden state when the first lacks the
    embeddings, to a sum when the last lacks the output: the activations of one micro-batch
    through all of the rank's blocks."""
    h = inputs
    with _loss_context(dims, config):
        for part in parts:
            h = part(h)
        if getattr(parts[-1], "output", None) is not None:
            loss = cross_entropy_sum(h, labels)
        else:  # the gradient the next stage sends back has the hidden state's shape
            loss = h.float().sum()
        del h
        if after_forward is not None:
            after_forward()
        loss.backward()


def train_step(
    parts: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    config: Config,
    dims: ParallelDims,
) -> None:
    forward_backward(parts, inputs, labels, config, dims)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _loss_context(dims: ParallelDims, config: Config) -> contextlib.AbstractContextManager[None]:
    if dims.tp > 1 and config.parallelism.enable_loss_parallel:
        return loss_parallel()
    return contextlib.nullcontext()


@dataclass(frozen=True)
class DepthProfile:
    """A rank's peak by component as ``base + per_layer × blocks``."""

    base: dict[str, int]
    per_layer: dict[str, int]

    def at(self, layers: int) -> dict[str, int]:
        return {k: self.base[k] + layers * self.per_layer[k] for k in ROWS}


def depth_profile(config: Config, world_size: int, rank: int, *, vocab_size: int) -> DepthProfile:
    """``step_peak`` of models of 2 and 3 blocks (llama3's dataclass config), on a fake
    world: every block adds the same parameters, gradients, states and saved activations,
    while the all-gathered blocks, temporaries and communication buffers are the same few
    blocks' at any depth."""
    peaks = []
    for n in (2, 3):
        with fake_world(rank, world_size):
            peaks.append(step_peak(config, world_size, vocab_size=vocab_size, n_layers=n))
    two, three = peaks
    per_layer = {k: three[k] - two[k] for k in ROWS}
    return DepthProfile({k: two[k] - 2 * per_layer[k] for k in ROWS}, per_layer)


def scaled_peak(config: Config, world_size: int, rank: int, *, vocab_size: int) -> dict[str, int]:
    """``step_peak`` of the whole model; of a llama3 model of more than 3 blocks, from its
    ``depth_profile`` (exact: tests/distributed/test_estimate.py). Minutes become seconds.
    Under pipeline parallel, of the rank's whole stages (2- and 3-block models do not split
    into pp stages)."""
    model_config = get_model_spec(config.model.name).model_config(config, vocab_size=vocab_size)
    layers = model_config.n_layers
    if layers <= 3 or config.parallelism.pp > 1 or not dataclasses.is_dataclass(model_config):
        with fake_world(rank, world_size):
            return step_peak(config, world_size, vocab_size=vocab_size)
    return depth_profile(config, world_size, rank, vocab_size=vocab_size).at(layers)


def estimate(config: Config, world_size: int, rank: int = 0) -> RankMemory:
    """Rank ``rank``'s peak of a ``world_size``-rank run of ``config``, and its activations
    under each activation-checkpointing mode."""
    validate_config(config)
    ParallelDims.from_config(config.parallelism, world_size)
    vocab_size = tokenizer_vocab_size(config)
    by_mode: dict[str, dict[str, int]] = {}
    for mode in AC_MODES:
        ac = dataclasses.replace(config.activation_checkpoint, mode=mode)
        eager = dataclasses.replace(config.compile, enable=False)
        variant = dataclasses.replace(config, activation_checkpoint=ac, compile=eager)
        by_mode[mode] = scaled_peak(variant, world_size, rank, vocab_size=vocab_size)
    return RankMemory(
        peak=by_mode[config.activation_checkpoint.mode],
        activations_by_ac={mode: peak["activations"] for mode, peak in by_mode.items()},
    )


def format_estimate(
    config: Config, world_size: int, rank: int, memory: RankMemory, gpu_memory_gib: float | None
) -> str:
    p = config.parallelism
    dims = ParallelDims.from_config(p, world_size)
    layout = " × ".join(
        f"{n} {getattr(dims, n)}" for n in ("dp_replicate", "dp_shard", "cp", "tp", "pp")
    )
    lines = [
        f"memory of rank {rank} of {world_size} ({layout}), {config.model.name}/"
        f"{config.model.flavor}, seq_len {config.training.seq_len}, local batch "
        f"{config.training.local_batch_size}, {config.training.mixed_precision_param} compute, "
        f"activation checkpointing {config.activation_checkpoint.mode}; at the peak of a "
        "training step:",
    ]
    width = max(len(r) for r in ROWS)
    for row in ROWS:
        lines.append(f"  {row:<{width}}  {memory.peak[row] / GIB:9.3f} GiB")
    lines.append(f"  {'total':<{width}}  {memory.total / GIB:9.3f} GiB")
    modes = ", ".join(f"{m} {b / GIB:.3f} GiB" for m, b in memory.activations_by_ac.items())
    lines.append(f"activations by --activation_checkpoint.mode: {modes}")
    if gpu_memory_gib is not None:
        fits = memory.total <= gpu_memory_gib * GIB
        verdict = "fits in" if fits else "does NOT fit in"
        lines.append(
            f"{verdict} {gpu_memory_gib:g} GiB per GPU "
            f"({100 * memory.total / (gpu_memory_gib * GIB):.0f}% of it; the CUDA caching "
            "allocator's fragmentation and the CUDA context, ~1-3 GiB, come on top)"
        )
    return "\n".join(lines)
