"""``tetrad plan``: the layouts of a model on a cluster that fit in memory, fastest first.

Memory comes from the estimator (``depth_profile``: the real model, parallelized on a fake
process group, on fake tensors), per tensor-parallel degree and activation-checkpointing mode,
at FSDP 2 and one sequence per micro-batch; its sharded components (parameters, gradients,
optimizer states) are rescaled to the layout's FSDP degree and its activations and temporaries
to the micro-batch size, and a pipeline stage holds ``layers / pp`` blocks, the embeddings and
the output (conservative: each stage holds one of them), and 1F1B's in-flight micro-batches.

Step time is a roofline of stated constants (``GPUS``): compute at an MFU ceiling (plus the
forward recomputed under activation checkpointing), FSDP's all-gathers and reduce-scatter
(overlapped with compute: only the excess shows), tensor parallel's per-layer collectives
(exposed), and the pipeline bubble. Pipeline point-to-point traffic is ignored (one
activation per micro-batch per stage boundary)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tetrad.config import Config, ConfigError
from tetrad.models.registry import get_model_spec
from tetrad.plan.dry_run import tokenizer_vocab_size
from tetrad.plan.estimate import AC_MODES, GIB, ROWS, ACMode, DepthProfile, depth_profile

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
RECOMPUTE = {"none": 1.0, "selective": 1.1, "full": 4 / 3}
"""Compute factor: full recomputes the forward (a third of a step); selective its cheap ops."""


@dataclass(frozen=True)
class Layout:
    dp_shard: int
    tp: int
    pp: int
    ac: ACMode
    local_batch: int
    """Sequences per rank per step; under pipeline parallel, 1F1B micro-batches of one."""
    dp_replicate: int = 1
    """HSDP: replicas of the FSDP group, gradients all-reduced between them."""

    @property
    def microbatches(self) -> int:
        return self.local_batch if self.pp > 1 else 1

    def describe(self) -> str:
        pp = f" × pp {self.pp} (1F1B, {self.microbatches} mb)" if self.pp > 1 else ""
        hsdp = f"hsdp {self.dp_replicate} × " if self.dp_replicate > 1 else ""
        return f"{hsdp}fsdp {self.dp_shard} × tp {self.tp}{pp}"


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
            self.params = sum(p.numel() for p in spec.build_model(self.model_config).parameters())
        self._profiles: dict[tuple[int, ACMode], DepthProfile] = {}

    def layouts(self) -> list[Layout]:
        """Every candidate: tp and pp powers of two, FSDP over the rest or (HSDP) over one
        node's worth of ranks with replicas across, each AC mode."""
        found = []
        for tp, pp in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
            if self.gpus % (tp * pp):
                continue
            dp = self.gpus // (tp * pp)
            node_shard = max(1, self.gpu.per_node // tp)
            replicas = {1} | ({dp // node_shard} if dp % node_shard == 0 else set())
            batches = (1, 2) if pp == 1 else (pp, 2 * pp)
            for r, ac, batch in itertools.product(sorted(replicas), AC_MODES, batches):
                found.append(Layout(dp // r, tp, pp, ac, batch, dp_replicate=r))
        return found

    def judge(self, layout: Layout) -> Verdict:
        """Whether ``layout`` fits and, if so, its estimated step time."""
        world = layout.dp_replicate * layout.dp_shard * layout.tp * layout.pp
        if world != self.gpus:
            return Verdict(layout, False, f"uses {world} GPUs, not {self.gpus}")
        if layout.tp > self.gpu.per_node:
            return Verdict(
                layout, False, f"tp {layout.tp} spans nodes of {self.gpu.per_node} GPUs: its "
                "per-layer collectives would cross the network",
            )  # fmt: skip
        try:
            memory = self.memory(layout)
        except ConfigError as e:
            return Verdict(layout, False, str(e))
        gib = memory / GIB
        if gib > self.memory_gib:
            return Verdict(layout, False, f"needs {gib:.1f} GiB > {self.memory_gib:g} GiB", gib)
        terms = self.step_terms(layout)
        step = max(terms["compute"], terms["fsdp"]) + terms["tp"] + terms["bubble"]
        exposed = {**terms, "fsdp": max(0.0, terms["fsdp"] - terms["compute"])}
        dominant = max(exposed, key=lambda k: exposed[k])
        tokens = layout.local_batch * self.config.training.seq_len / (layout.tp * layout.pp)
        return Verdict(layout, True, _WHY[dominant], gib, step, tokens / step)

    def memory(self, layout: Layout) -> int:
        """Peak bytes of the worst pipeline stage's rank: the blocks' saved activations of
        every micro-batch in flight (1F1B's first stage: min(pp, micro-batches)), the
        embeddings' and the loss's (the profile's base) of one."""
        profile = self._profile(layout.tp, layout.ac)
        layers = self.stage_layers(layout)
        sequences = layout.local_batch // layout.microbatches
        in_flight = min(layout.pp, layout.microbatches)
        total = 0.0
        for k in ROWS:
            base, per_layer = profile.base[k], profile.per_layer[k] * layers
            if k in SHARDED:
                total += (base + per_layer) * PROFILE_SHARDS / layout.dp_shard
            elif k in PER_TOKEN:
                flight = in_flight if k == "activations" else 1
                total += (base + per_layer * flight) * sequences
            else:
                total += base + per_layer
        return int(total)

    def stage_layers(self, layout: Layout) -> int:
        """Blocks of the largest stage (--parallelism.pp_layers_per_stage of that many when
        pp does not divide the model's layers)."""
        return -(-self.model_config.n_layers // layout.pp)

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
        tokens = layout.local_batch * seq
        flops = self.flops_per_token * tokens / (layout.tp * layout.pp) * RECOMPUTE[layout.ac]
        compute = flops / (g.bf16_tflops * 1e12 * MFU_CEILING)
        stage_params = self.params / (layout.pp * layout.tp)  # what one rank all-gathers
        # bf16 all-gather in forward and again in backward, fp32 reduce-scatter of gradients.
        fsdp_bytes = stage_params * (2 + 2 + 4) * (layout.dp_shard - 1) / layout.dp_shard
        shard_group = layout.dp_shard * layout.tp
        fsdp = fsdp_bytes / (self._bandwidth(shard_group <= g.per_node) * 1e9)
        # HSDP: the fp32 gradient shards all-reduced across the replicas (a ring: twice).
        r = layout.dp_replicate
        hsdp_bytes = 2 * stage_params / layout.dp_shard * 4 * (r - 1) / r
        fsdp += hsdp_bytes / (self._bandwidth(shard_group * r <= g.per_node) * 1e9)
        # Sequence parallel: per block 2 all-gathers + 2 reduce-scatters forward, as many
        # backward, of [tokens, dim] bf16 activations.
        tp_bytes = 8 * tokens * m.dim * 2 * (layout.tp - 1) / layout.tp * self.stage_layers(layout)
        tp = tp_bytes / (g.nvlink_gbps * 1e9)
        bubble = (compute + tp) * (layout.pp - 1) / (layout.microbatches + layout.pp - 1)
        return {"compute": compute, "fsdp": fsdp, "tp": tp, "bubble": bubble}

    def _bandwidth(self, intra_node: bool) -> float:
        return self.gpu.nvlink_gbps if intra_node else self.gpu.network_gbps

    def plan(self) -> list[Verdict]:
        """Every candidate's verdict, the fitting ones fastest first."""
        verdicts = [self.judge(layout) for layout in self.layouts()]
        return sorted(verdicts, key=lambda v: (not v.fits, -v.tokens_per_gpu_s))


_WHY = {
    "compute": "compute-bound: the matmuls at the MFU ceiling",
    "fsdp": "FSDP traffic outlasts the compute it overlaps",
    "tp": "tensor parallel's per-layer collectives",
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
        f"{'layout':<36} {'AC':<9} {'batch':>5} {'GiB':>6} {'step s':>7} {'tok/s/GPU':>9}  "
        "dominant term",
    ]
    for v in fitting[:top]:
        lo = v.layout
        lines.append(
            f"{lo.describe():<36} {lo.ac:<9} {lo.local_batch:>5} {v.memory_gib:>6.1f} "
            f"{v.step_s:>7.2f} {v.tokens_per_gpu_s:>9.0f}  {v.reason}"
        )
    if not fitting:
        lines.append("no layout fits: more GPUs, a shorter --training.seq_len, or more memory")
    return "\n".join(lines)
