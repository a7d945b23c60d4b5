"""``tetrad plan``: the layouts of a model on a cluster that fit in memory, fastest first.

Memory comes from the estimator (``depth_profile``: the real model, parallelized on a fake
process group, on fake tensors), per tensor-parallel degree and activation-checkpointing mode,
at FSDP 2, one sequence per micro-batch and a rank's ``seq_len / cp`` tokens; its sharded
components (parameters, gradients, optimizer states) are rescaled to the layout's FSDP degree
(dp_shard × cp: FSDP shards over both) and its activations and temporaries to the micro-batch
size, and a pipeline rank holds ``layers / pp`` blocks, the embeddings and the output
(conservative: each rank holds one of them), and its schedule's micro-batches in flight
(``SCHEDULES``). Context parallel's gathered keys and values (the whole sequence, per block)
are added by formula: the fake-tensor estimator cannot run its attention (``CausalBias``
is a tensor subclass FakeTensorMode refuses).

Step time is a roofline of stated constants (``GPUS``): compute at an MFU ceiling (plus the
forward recomputed under activation checkpointing), FSDP's all-gathers and reduce-scatter
(overlapped with compute: only the excess shows), tensor parallel's and context parallel's
per-layer collectives (exposed: each feeds the op right after it), and the pipeline bubble.
Pipeline point-to-point traffic is ignored (one activation per micro-batch per stage
boundary)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tetrad.config import Config, ConfigError, validate_config
from tetrad.config.job_config import SPLIT_BACKWARD_SCHEDULES, PipelineScheduleName
from tetrad.distributed.pipeline import plan_pipeline
from tetrad.models.registry import get_model_spec
from tetrad.plan.dry_run import tokenizer_vocab_size
from tetrad.plan.estimate import AC_MODES, GIB, ROWS, ACMode, DepthProfile, depth_profile
from tetrad.plan.schedules import SCHEDULES

SHARDED = ("parameters", "gradients", "optimizer states")
PER_TOKEN = ("activations", "backward temporaries", "inputs")
PROFILE_SHARDS = 2
MFU_CEILING = 0.4
"""torchtitan's published Llama 3 runs on H100 reach 35-45% MFU (docs/performance.md)."""


@dataclass(frozen=True)
class Gpu:
    bf16_tflops: float
    """Dense bf16 peak."""
    nvlink_gbps: float
    """GB/s per GPU per direction within a node."""
    network_gbps: float
    """GB/s per GPU per direction between nodes."""
    per_node: int = 8


# NVIDIA's datasheets: H100/H200 SXM 989 TFLOPS dense bf16, NVLink 4 900 GB/s both ways;
# A100 SXM 312 TFLOPS, NVLink 3 600 GB/s. One 400 Gb/s (H100) / 200 Gb/s (A100) InfiniBand NIC
# per GPU.
GPUS = {
    "h100": Gpu(bf16_tflops=989, nvlink_gbps=450, network_gbps=50),
    "h200": Gpu(bf16_tflops=989, nvlink_gbps=450, network_gbps=50),
    "a100": Gpu(bf16_tflops=312, nvlink_gbps=300, network_gbps=25),
}
MIN_CP_TOKENS = 4096
"""Fewest tokens per context-parallel rank the planner proposes: below them attention is a
small share of a block's work and the K/V exchange outweighs what cp saves."""
RECOMPUTE = {"none": 1.0, "selective": 1.1, "full": 4 / 3}
"""Compute factor: full recomputes the forward (a third of a step); selective its cheap ops."""


@dataclass(frozen=True)
class Layout:
    dp_shard: int
    tp: int
    pp: int
    ac: ACMode
    local_batch: int
    """Sequences per data-parallel rank per step; under pipeline parallel, micro-batches of
    one sequence."""
    dp_replicate: int = 1
    """HSDP: replicas of the FSDP group, gradients all-reduced between them."""
    cp: int = 1
    """Context parallel: each sequence split over cp ranks (FSDP shards over dp_shard × cp)."""
    schedule: PipelineScheduleName = "1F1B"
    """Pipeline schedule (``SCHEDULES``), with pp > 1."""

    @property
    def microbatches(self) -> int:
        return self.local_batch if self.pp > 1 else 1

    def describe(self) -> str:
        pp = f" × pp {self.pp} ({self.schedule}, {self.microbatches} mb)" if self.pp > 1 else ""
        hsdp = f"hsdp {self.dp_replicate} × " if self.dp_replicate > 1 else ""
        cp = f" × cp {self.cp}" if self.cp > 1 else ""
        return f"{hsdp}fsdp {self.dp_shard}{cp} × tp {self.tp}{pp}"


@dataclass(frozen=True)
class Verdict:
    layout: Layout
    fits: bool
    reason: str
    """Why it does not fit, or the step time's dominant term."""
    memory_gib: float = 0.0
    step_s: float = 0.0
    tokens_per_gpu_s: float = 0.0


class Planner:
    """Judges layouts of ``config``'s model on ``gpus`` GPUs of ``gpu_memory_gib`` each."""

    def __init__(self, config: Config, gpus: int, gpu_memory_gib: float, gpu: str) -> None:
        if gpu not in GPUS:
            raise ConfigError(f"--gpu {gpu!r}: choose one of {', '.join(GPUS)}")
        self.config, self.gpus, self.memory_gib, self.gpu = config, gpus, gpu_memory_gib, GPUS[gpu]
        self.vocab_size = tokenizer_vocab_size(config)
        spec = get_model_spec(config.model.name)
        self.model_config = spec.model_config(config, vocab_size=self.vocab_size)
        if not dataclasses.is_dataclass(self.model_config):
            raise ConfigError(f"tetrad plan covers llama3 models, not --model.name {spec.name}")
        self.flops_per_token = spec.num_flops_per_token(self.model_config, config.training.seq_len)
        with torch.device("meta"):
            model = spec.build_model(self.model_config)
        if model.moe_layers():
            raise ConfigError(
                f"tetrad plan does not cover mixtures of experts (--model.name {spec.name}) yet: "
                "its memory estimate cannot run their routing; check a layout with `tetrad "
                "train --dry-run`"
            )
        self.params = sum(p.numel() for p in model.parameters())
        # The block names as the trainer's pipeline split sees them.
        self.layer_names = [name for name, _ in model.blocks().named_children()]
        self._profiles: dict[tuple[int, ACMode], DepthProfile] = {}

    def layouts(self) -> list[Layout]:
        """Every candidate: tp, pp and cp powers of two (cp while a rank keeps at least
        ``MIN_CP_TOKENS`` tokens), FSDP over the rest or (HSDP) over one node's worth of ranks
        with replicas across, each AC mode, each pipeline schedule at pp, 2·pp and 4·pp
        micro-batches."""
        seq, found = self.config.training.seq_len, []
        cps = [cp for cp in (1, 2, 4, 8, 16, 32) if seq // cp >= MIN_CP_TOKENS or cp == 1]
        for tp, pp, cp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8), cps):
            if self.gpus % (tp * pp * cp):
                continue
            dp = self.gpus // (tp * pp * cp)
            # HSDP: an FSDP group (dp_shard × cp × tp ranks) of one node, replicas across.
            node_shard = self.gpu.per_node // (tp * cp)
            hsdp = node_shard >= 1 and dp % node_shard == 0
            replicas = {1} | ({dp // node_shard} if hsdp else set())
            batches = (1, 2) if pp == 1 else (pp, 2 * pp, 4 * pp)
            schedules = ("1F1B",) if pp == 1 else tuple(SCHEDULES)
            for r, ac, batch, schedule in itertools.product(
                sorted(replicas), AC_MODES, batches, schedules
            ):
                found.append(Layout(dp // r, tp, pp, ac, batch, r, cp, schedule))
        return found

    def judge(self, layout: Layout) -> Verdict:
        """Whether ``layout`` fits and, if so, its estimated step time."""
        world = layout.dp_replicate * layout.dp_shard * layout.cp * layout.tp * layout.pp
        if world != self.gpus:
            return Verdict(layout, False, f"uses {world} GPUs, not {self.gpus}")
        if layout.tp > self.gpu.per_node:
            return Verdict(
                layout, False, f"tp {layout.tp} spans nodes of {self.gpu.per_node} GPUs: its "
                "per-layer collectives would cross the network",
            )  # fmt: skip
        try:
            self.check(layout)
            memory = self.memory(layout)
        except ConfigError as e:
            return Verdict(layout, False, str(e))
        gib = memory / GIB
        if gib > self.memory_gib:
            return Verdict(layout, False, f"needs {gib:.1f} GiB > {self.memory_gib:g} GiB", gib)
        terms = self.step_terms(layout)
        step = max(terms["compute"], terms["fsdp"]) + terms["tp"] + terms["cp"] + terms["bubble"]
        exposed = {**terms, "fsdp": max(0.0, terms["fsdp"] - terms["compute"])}
        dominant = max(exposed, key=lambda k: exposed[k])
        ranks = layout.tp * layout.pp * layout.cp  # that share one data-parallel rank's batch
        tokens = layout.local_batch * self.config.training.seq_len / ranks
        return Verdict(layout, True, _WHY[dominant], gib, step, tokens / step)

    def check(self, layout: Layout) -> None:
        """The trainer's own checks of the layout's config (``validate_config``, and
        ``plan_pipeline`` for the schedule's stages and micro-batches): a ConfigError says
        why the trainer would refuse it."""
        c, stages = self.config, layout.pp * SCHEDULES[layout.schedule].stages_per_rank
        per_stage = -(-len(self.layer_names) // stages)
        uneven = len(self.layer_names) % stages != 0
        variant = dataclasses.replace(
            c,
            parallelism=dataclasses.replace(
                c.parallelism, dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard,
                tp=layout.tp, pp=layout.pp, cp=layout.cp, pp_schedule=layout.schedule,
                pp_microbatches=layout.microbatches,
                pp_layers_per_stage=per_stage if uneven else None,
            ),
            training=dataclasses.replace(
                c.training, local_batch_size=layout.local_batch, global_batch_size=-1
            ),
        )  # fmt: skip
        validate_config(variant)
        if layout.pp > 1:
            plan_pipeline(variant, self.layer_names, 0)

    def memory(self, layout: Layout) -> int:
        """Peak bytes of the worst pipeline rank: the blocks' saved activations of every
        micro-batch its schedule keeps in flight, the embeddings' and the loss's (the
        profile's base) of one. Per-token rows scale with the rank's tokens, seq_len / cp:
        the estimator's activations are linear in them (8B, selective AC: 4.23 GiB at 8192
        tokens, 8.45 at 16384). Context parallel adds the whole sequence's gathered K/V per
        block, saved for backward without AC and one block's worth, recomputed, with it.
        Schedules that split backward keep the rank's parameters gathered (no reshard)."""
        profile = self._profile(layout.tp, layout.ac)
        layers = self.stage_layers(layout)
        sequences = layout.local_batch // layout.microbatches
        schedule = SCHEDULES[layout.schedule]
        in_flight = schedule.in_flight(layout.pp, layout.microbatches) if layout.pp > 1 else 1
        total = 0.0
        for k in ROWS:
            base, per_layer = profile.base[k], profile.per_layer[k] * layers
            if k in SHARDED:
                total += (base + per_layer) * PROFILE_SHARDS / (layout.dp_shard * layout.cp)
            elif k in PER_TOKEN:
                flight = in_flight if k == "activations" else 1
                total += (base + per_layer * flight) * sequences / layout.cp
            else:
                total += base + per_layer
        if layout.cp > 1:
            saved = layers * in_flight if layout.ac == "none" else 1
            total += self.gathered_kv_bytes(layout) * saved * sequences
        if layout.pp > 1 and layout.schedule in SPLIT_BACKWARD_SCHEDULES:
            total += 2 * self.params / (layout.pp * layout.tp)  # bf16, the whole rank's blocks
        return int(total)

    def gathered_kv_bytes(self, layout: Layout) -> float:
        """Bytes of one block's keys and values (bf16) a cp rank gathers from the others for
        one sequence: (cp - 1) / cp of the sequence, its share of the kv heads under tp."""
        m, seq = self.model_config, self.config.training.seq_len
        kv_width = m.kv_heads * (m.dim // m.n_heads) // layout.tp
        return 2 * 2 * seq * kv_width * (layout.cp - 1) / layout.cp

    def stage_layers(self, layout: Layout) -> int:
        """Blocks of the largest pipeline rank (--parallelism.pp_layers_per_stage of that
        many when the stages do not divide the model's layers)."""
        v = SCHEDULES[layout.schedule].stages_per_rank if layout.pp > 1 else 1
        return -(-self.model_config.n_layers // (layout.pp * v)) * v

    def _profile(self, tp: int, ac: ACMode) -> DepthProfile:
        if (tp, ac) not in self._profiles:
            c = self.config
            variant = dataclasses.replace(
                c,
                parallelism=dataclasses.replace(
                    c.parallelism, tp=tp, pp=1, cp=1, dp_replicate=1, dp_shard=PROFILE_SHARDS
                ),
                activation_checkpoint=dataclasses.replace(c.activation_checkpoint, mode=ac),
                training=dataclasses.replace(c.training, local_batch_size=1, global_batch_size=-1),
                compile=dataclasses.replace(c.compile, enable=False),
            )
            self._profiles[tp, ac] = depth_profile(
                variant, PROFILE_SHARDS * tp, 0, vocab_size=self.vocab_size
            )
        return self._profiles[tp, ac]

    def step_terms(self, layout: Layout) -> dict[str, float]:
        """Seconds per step of each term, before overlap."""
        g, m, seq = self.gpu, self.model_config, self.config.training.seq_len
        tokens = layout.local_batch * seq // layout.cp  # a rank's
        flops = self.flops_per_token * tokens / (layout.tp * layout.pp) * RECOMPUTE[layout.ac]
        compute = flops / (g.bf16_tflops * 1e12 * MFU_CEILING)
        stage_params = self.params / (layout.pp * layout.tp)  # what one rank all-gathers
        # bf16 all-gather in forward and again in backward, fp32 reduce-scatter of gradients.
        shards = layout.dp_shard * layout.cp  # FSDP shards over both
        fsdp_bytes = stage_params * (2 + 2 + 4) * (shards - 1) / shards
        shard_group = layout.dp_shard * layout.cp * layout.tp
        fsdp = fsdp_bytes / (self._bandwidth(shard_group <= g.per_node) * 1e9)
        # HSDP: the fp32 gradient shards all-reduced across the replicas (a ring: twice).
        r = layout.dp_replicate
        hsdp_bytes = 2 * stage_params / shards * 4 * (r - 1) / r
        fsdp += hsdp_bytes / (self._bandwidth(shard_group * r <= g.per_node) * 1e9)
        # Sequence parallel: per block 2 all-gathers + 2 reduce-scatters forward, as many
        # backward, of [tokens, dim] bf16 activations.
        tp_bytes = 8 * tokens * m.dim * 2 * (layout.tp - 1) / layout.tp * self.stage_layers(layout)
        tp = tp_bytes / (g.nvlink_gbps * 1e9)
        # Context parallel (tetrad.distributed.context_parallel): per block an all-gather of
        # K and V forward (again when full AC recomputes it), a reduce-scatter of their
        # gradients backward. Exposed: attention waits for it. Over NVLink while cp × tp
        # ranks fit in a node (the mesh puts cp next to tp), else over the network.
        passes = 3 if layout.ac == "full" else 2
        cp_bytes = self.gathered_kv_bytes(layout) * layout.local_batch * passes
        cp_bytes *= self.stage_layers(layout)
        cp = cp_bytes / (self._bandwidth(layout.cp * layout.tp <= g.per_node) * 1e9)
        bubble = 0.0
        if layout.pp > 1:
            fraction = SCHEDULES[layout.schedule].bubble(layout.pp, layout.microbatches)
            bubble = (compute + tp + cp) * fraction
        return {"compute": compute, "fsdp": fsdp, "tp": tp, "cp": cp, "bubble": bubble}

    def _bandwidth(self, intra_node: bool) -> float:
        return self.gpu.nvlink_gbps if intra_node else self.gpu.network_gbps

    def plan(self) -> list[Verdict]:
        """Every candidate's verdict, the fitting ones fastest first; within 3 significant
        digits of each other (below the model's precision), the simpler first: fewer
        pipeline stages, then less context and tensor parallel, then fewer micro-batches."""
        verdicts = [self.judge(layout) for layout in self.layouts()]

        def key(v: Verdict) -> tuple[bool, float, int, int, int, int]:
            lo = v.layout
            speed = float(f"{v.tokens_per_gpu_s:.3g}")
            return (not v.fits, -speed, lo.pp, lo.cp, lo.tp, lo.local_batch)

        return sorted(verdicts, key=key)


_WHY = {
    "compute": "compute-bound: the matmuls at the MFU ceiling",
    "fsdp": "FSDP traffic outlasts the compute it overlaps",
    "tp": "tensor parallel's per-layer collectives",
    "cp": "context parallel's K/V all-gathers",
    "bubble": "pipeline bubble: too few micro-batches per stage",
}


def format_plan(planner: Planner, verdicts: Sequence[Verdict], top: int) -> str:
    c, g = planner.config, planner.gpu
    fitting = [v for v in verdicts if v.fits]
    lines = [
        f"{c.model.name}/{c.model.flavor} on {planner.gpus} GPUs of {planner.memory_gib:g} GiB, "
        f"seq_len {c.training.seq_len}; {len(fitting)} of {len(verdicts)} layouts fit. Step "
        f"time: compute at {MFU_CEILING:.0%} of {g.bf16_tflops:g} TFLOPS, links "
        f"{g.nvlink_gbps:g} GB/s in a node, {g.network_gbps:g} GB/s between nodes",
        f"{'layout':<52} {'AC':<9} {'batch':>5} {'GiB':>6} {'step s':>7} {'tok/s/GPU':>9}  "
        "dominant term",
    ]
    for v in fitting[:top]:
        lo = v.layout
        lines.append(
            f"{lo.describe():<52} {lo.ac:<9} {lo.local_batch:>5} {v.memory_gib:>6.1f} "
            f"{v.step_s:>7.2f} {v.tokens_per_gpu_s:>9.0f}  {v.reason}"
        )
    if not fitting:
        lines.append("no layout fits: more GPUs, a shorter --training.seq_len, or more memory")
    return "\n".join(lines)
