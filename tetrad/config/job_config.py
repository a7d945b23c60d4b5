"""The typed configuration of a training job: one kw-only dataclass per section.

Every field's docstring is its ``--help`` text. Defaults describe the out-of-the-box run: the
Llama-3 ``debug`` preset on the embedded default corpus, about a minute on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

StopSignal = Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]
"""Signals --job.stop_signals may name."""

CheckpointState = Literal["model", "optimizer", "lr_scheduler", "dataloader", "train_state"]
"""The named states of a checkpoint, in the order they are built (components/checkpoint_states
holds them; the config names them here, below that layer)."""


@dataclass(kw_only=True)
class JobConfig:
    dump_folder: str = "outputs"
    """Run folder: config.toml, metrics.jsonl, logs, checkpoints and traces go here."""

    description: str = "tetrad training run"
    """Free text, written to the run folder's config.toml."""

    print_config: bool = False
    """Print the resolved configuration at start-up."""

    stop_signals: list[StopSignal] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that stop the run cleanly (preemption): every rank finishes the current step,
    a checkpoint is saved if checkpointing is on, exit code 0; the next start resumes."""


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "llama3"
    """Model family from the registry: llama3, qwen3_moe, deepseek_moe (mixtures of experts), or
    hf (a Hugging Face model, see hf_path)."""

    flavor: str = "debug"
    """Preset of the family (llama3: tiny, tiny_pp, debug, 1B, 3B, 8B, 70B, 405B; qwen3_moe: tiny,
    debug, 30B-A3B, 235B-A22B; deepseek_moe: tiny, debug; unused by hf,
    whose config.json defines the model)."""

    hf_path: str | None = None
    """With --model.name hf: a local folder holding an HF config.json (and usually safetensors
    and tokenizer.json), or a hub id such as Qwen/Qwen2.5-7B (downloaded on first use)."""

    hf_overrides: dict[str, Any] = field(default_factory=dict)
    """With --model.name hf: changes to config.json, each one logged; on the command line
    key=value,... with JSON values (e.g. num_hidden_layers=2,hidden_size=64 for a debug-size
    variant), in TOML an inline table."""

    hf_init: Literal["auto", "pretrained", "random"] = "auto"
    """With --model.name hf: pretrained loads the folder's safetensors; random initialises from
    --debug.seed; auto = pretrained when the folder holds weights, else random."""


@dataclass(kw_only=True)
class TrainingConfig:
    steps: int = 60
    """Number of optimizer steps."""

    seq_len: int = 256
    """Tokens per sequence."""

    local_batch_size: int = 8
    """Sequences per micro-batch on each data-parallel rank."""

    global_batch_size: int = -1
    """Sequences per optimizer step over all data-parallel ranks; -1 = local × dp degree.
    Gradient accumulation steps = global / (local × dp degree), which must divide exactly."""

    max_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    mixed_precision_param: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter/compute dtype on GPU (ignored on CPU, where bf16 matmul is ~130x slower and
    training runs in float32)."""

    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """Gradient reduction dtype for data parallelism."""

    enable_cpu_offload: bool = False
    """Keep FSDP-sharded parameters, gradients and optimizer states in CPU memory."""

    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is NaN or infinite: stop ends the run (exit code 3)
    naming the step and the last good checkpoint; skip drops the step's update (optimizer and
    LR schedule untouched) and counts it in the metrics' skipped_steps."""

    max_consecutive_skips: int = 3
    """With on_nonfinite skip: stop after this many non-finite steps in a row."""

    gc_freq: int = 50
    """Collect Python garbage (generation 1) every this many steps, with automatic collection
    off: every rank collects at the same steps instead of one rank stalling the others at a
    random moment; 0 = Python's automatic collection."""


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["adamw", "adam"] = "adamw"
    """Optimizer: adamw (decoupled weight decay) or adam."""

    lr: float = 3e-3
    """Peak learning rate."""

    beta1: float = 0.9
    """Adam beta1."""

    beta2: float = 0.95
    """Adam beta2."""

    eps: float = 1e-8
    """Adam epsilon."""

    weight_decay: float = 0.1
    """Weight decay (decoupled for adamw, L2 for adam)."""

    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """Kernel choice: auto picks fused where the device supports it, else foreach."""

    state_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the Adam moments. bfloat16 halves optimizer memory (4 instead of 8 bytes per
    parameter) while parameters, gradients and the update stay fp32; the cost is moments rounded
    to 8 mantissa bits: with beta2 above about 0.998 the second moment can no longer decrease
    (beta2 × v rounds back to v). Uses tetrad's own per-tensor update, so leave
    --optimizer.implementation at auto."""


@dataclass(kw_only=True)
class LRSchedulerConfig:
    warmup_steps: int = 10
    """Linear warmup steps from ~0 to the peak learning rate."""

    decay_ratio: float | None = None
    """Fraction of the steps spent decaying at the end (warmup-stable-decay); None = decay over
    every step after warmup."""

    decay_type: Literal["linear", "cosine", "sqrt"] = "linear"
    """Shape of the decay."""

    min_lr_factor: float = 0.0
    """The learning rate at the end, as a fraction of the peak."""

    total_steps: int | None = None
    """Length of the schedule; None = --training.steps. Set it to keep a run's schedule when it
    is stopped early and resumed, or extended."""


PipelineScheduleName = Literal[
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
]


@dataclass(kw_only=True)
class ParallelismConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (DDP, or the replicate dimension of HSDP)."""

    dp_shard: int = -1
    """FSDP sharding degree; -1 fills the rest of the world size."""

    tp: int = 1
    """Tensor-parallel degree."""

    pp: int = 1
    """Pipeline-parallel degree."""

    cp: int = 1
    """Context-parallel degree."""

    ep: int = 1
    """Expert-parallel degree (MoE models): routed experts are split over this many ranks,
    which exchange tokens by all-to-all. Borrowed from dp_shard × cp, not an extra factor of
    the world size: it must be a multiple of cp that divides dp_shard × cp."""

    enable_sequence_parallel: bool = True
    """Under tensor parallel, also shard norms and residuals along the sequence."""

    enable_loss_parallel: bool = True
    """Under tensor parallel, compute the loss on vocab-sharded logits (never gathered)."""

    enable_async_tp: bool = False
    """Async tensor parallel: Inductor overlaps TP's all-gathers and reduce-scatters with the
    matmuls (micro-pipelining through symmetric memory). Needs --compile.enable,
    --parallelism.tp > 1 and CUDA GPUs."""

    fsdp_reshard_after_forward: bool | None = None
    """Free gathered parameters after each block's forward (less memory, one more all-gather).
    None = true, except under the pipeline schedules that split backward
    (InterleavedZeroBubble, ZBVZeroBubble, DualPipeV): they compute weight gradients after
    FSDP would have resharded, so they need false."""

    pp_schedule: PipelineScheduleName = "1F1B"
    """Pipeline schedule (with --parallelism.pp > 1). GPipe and 1F1B run one stage per rank;
    Interleaved1F1B, LoopedBFS and InterleavedZeroBubble two or more (virtual) stages per rank;
    ZBVZeroBubble and DualPipeV exactly two per rank, in V order."""

    pp_microbatches: int = -1
    """Micro-batches the schedule splits each local batch into; -1 = the number of pipeline
    stages, the fewest that keep every stage busy. Must divide --training.local_batch_size."""

    pp_layers_per_stage: int | None = None
    """Transformer blocks per pipeline stage; None splits the blocks evenly over the stages
    (1 per rank, or 2 for multi-stage schedules). With a value, the stage count is
    ceil(n_layers / value) and the last stage takes the remainder."""


SPLIT_BACKWARD_SCHEDULES = frozenset({"InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"})
"""Schedules that split backward into input- and weight-gradient passes."""

V_SCHEDULES = frozenset({"ZBVZeroBubble", "DualPipeV"})
"""Exactly two stages per rank, placed in V order: rank r holds stages r and 2·pp − 1 − r."""


@dataclass(kw_only=True)
class CommConfig:
    init_timeout_seconds: int = 300
    """Timeout for setting up the process group and the first collectives."""

    train_timeout_seconds: int = 100
    """Timeout for each collective once training runs (a hung rank fails fast)."""

    flight_recorder_entries: int = 20000
    """Collectives each rank's c10d flight recorder keeps, dumped to
    <dump_folder>/flight_recorder/ on a collective timeout; 0 = off."""


@dataclass(kw_only=True)
class CheckpointConfig:
    enable: bool = False
    """Save DCP checkpoints under <dump_folder>/checkpoint and resume from the latest one."""

    interval: int = 500
    """Save every this many steps (and always at the last step)."""

    folder: str = "checkpoint"
    """Checkpoint folder, inside --job.dump_folder."""

    keep_latest_k: int = 0
    """Keep only the newest k complete checkpoints (older ones are deleted after each save);
    0 keeps all."""

    load_step: int = -1
    """Resume from this step's checkpoint instead of the latest complete one; -1 = latest.
    Needs --checkpoint.enable."""

    initial_load_path: str | None = None
    """A DCP checkpoint folder to start from when the run's own folder holds none, e.g. a seed
    checkpoint or another run's checkpoint, under any name (loaded with or without
    --checkpoint.enable); a loaded train state sets the step the run goes on from."""

    initial_load_in_hf: bool = False
    """--checkpoint.initial_load_path is a Hugging Face folder (model.safetensors or a sharded
    index, with config.json): load the model's weights from it. Needs
    --checkpoint.initial_load_path."""

    last_save_in_hf: bool = False
    """At the last step also export the weights as a Hugging Face folder, step-N-hf, that
    transformers' from_pretrained reads (in --checkpoint.export_dtype). Needs
    --checkpoint.enable."""

    exclude_from_loading: list[CheckpointState] = field(default_factory=list)
    """States not to load, which start fresh instead: model, optimizer, lr_scheduler, dataloader,
    train_state (e.g. optimizer,dataloader to fine-tune; in TOML an array)."""

    async_mode: Literal["disabled", "async"] = "disabled"
    """async: write each checkpoint in a background thread while training continues (after a
    copy of the state); disabled: training waits for the write."""

    create_seed_checkpoint: bool = False
    """Initialise the model, save it as step-0 (model only, in the model's own dtype) and exit.
    Any layout can create it (each rank writes its shards; the weights do not depend on the
    layout) and any layout can then start from these exact weights."""

    last_save_model_only: bool = False
    """At the last step save the model's weights only (no optimizer, data or train state)."""

    export_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the weights in a model-only last save and in a Hugging Face export (never of a
    seed checkpoint)."""

    overwrite: bool = False
    """Allow this run to replace existing checkpoints of the steps it saves (by default a run
    that would overwrite a checkpoint it did not resume from refuses to start)."""


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "default"
    """Text source: default (embedded Python stdlib corpus), c4, local, or a hub dataset name."""

    path: str | None = None
    """Local json/jsonl/parquet/text file or folder (implies dataset=local)."""

    dataset_config: str | None = None
    """Hub dataset configuration name (e.g. en for c4)."""

    split: str = "train"
    """Dataset split."""

    text_field: str = "text"
    """Column holding the text."""

    mix: str | None = None
    """A weighted mixture instead of dataset/path: "source:weight,...", each source default, c4,
    a local file or folder, or a hub name; weights are relative. Each document comes from a source
    drawn by weight, seeded by --debug.seed; a source that runs out restarts so the weights hold,
    and an epoch ends once every source has run out. text_field, dataset_config and split apply to
    every source."""

    tokenizer: str | None = None
    """tokenizer.json path, a folder holding one, or a hub id; default: the embedded tokenizer."""

    document_mask: bool = False
    """Pack documents with block-causal attention: a token attends only to its own document
    and rotary positions restart at each document (conversations are always packed so).
    Off: each packed row is one causal stream, the classic pretraining setup."""

    # ---- chat data (supervised fine-tuning) ----

    format: Literal["text", "chat"] = "text"
    """text: documents from --data.text_field, every token a target (pretraining). chat:
    conversations, records with `messages` ([{role, content}, ...], optional top-level `system`)
    or `prompt`/`completion` strings, rendered with a chat template; only assistant tokens are
    targets."""

    chat_template: Literal["auto", "chatml", "llama3"] = "auto"
    """With --data.format chat: auto = the tokenizer's own (the chat_template of the
    tokenizer_config.json beside its tokenizer.json), else the built-in chatml; chatml or llama3
    = that built-in template, whatever the tokenizer has."""

    train_on_prompt: bool = False
    """With --data.format chat: every token of a conversation is a target, not only the
    assistant's."""

    overlong: Literal["truncate", "drop"] = "truncate"
    """With --data.format chat: a conversation longer than --training.seq_len + 1 tokens is cut
    to that length (truncate; dropped if no assistant token is left) or skipped (drop); both
    counted in the log."""

    @property
    def document_masked(self) -> bool:
        """Whether batches carry document ids: conversations always, text with document_mask."""
        return self.document_mask or self.format == "chat"


@dataclass(kw_only=True)
class ValidationConfig:
    enable: bool = False
    """Evaluate a held-out loss (val_loss, val_perplexity) every --validation.freq steps and at
    the last step: no gradients, no optimizer, training data or RNG state touched."""

    freq: int = 100
    """Evaluate every this many steps."""

    steps: int = 10
    """Global batches per evaluation (local_batch_size × dp × accumulation sequences, each rank
    evaluating its rows): the same batches every time and under every layout."""

    dataset: str | None = None
    """Validation source, named as --data.dataset; with --validation.path and --validation.split
    unset too, a held-out slice of the training source (--validation.holdout_fraction of its
    documents, which training then never reads)."""

    path: str | None = None
    """Local validation file or folder (as --data.path)."""

    split: str | None = None
    """Split of the validation source (e.g. validation); default: --data.split."""

    holdout_fraction: float = 0.01
    """Share of the training source's documents held out for validation (chosen by a hash of
    each document, so the same ones under any layout and on resume) when no validation source
    is given."""


@dataclass(kw_only=True)
class MetricsConfig:
    log_freq: int = 5
    """Log a metrics line every this many steps (and at the first and last)."""

    enable_tensorboard: bool = False
    """Write TensorBoard scalars to <dump_folder>/tb."""

    peak_tflops: float | None = None
    """Device peak TFLOP/s for MFU; default: a datasheet table for known GPUs (bf16 dense), on
    CPU cores × clock × fp32 FLOPs per cycle of the CPU's ISA (the start-up log names it)."""

    enable_wandb: bool = False
    """Log the records of metrics.jsonl, at the same steps, and the config to Weights & Biases
    from rank 0; its files go to <dump_folder>/wandb (pip install 'tetrad[tracking]')."""

    wandb_project: str = "tetrad"
    """W&B project of the run."""

    wandb_entity: str | None = None
    """W&B entity (user or team); default: the logged-in user's default entity."""

    wandb_run_name: str | None = None
    """W&B run name; default: the name of --job.dump_folder."""

    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """online (needs `wandb login`), offline (a local run folder to `wandb sync` later) or
    disabled; default: W&B's own (the WANDB_MODE environment variable, else online)."""


@dataclass(kw_only=True)
class DebugConfig:
    seed: int = 0
    """Seed for weights and any randomness in training."""

    deterministic: bool = False
    """Use deterministic algorithms only (bitwise-reproducible runs, slower on GPU)."""

    log_all_ranks: bool = False
    """Print log lines from every rank, not only rank 0."""

    nonfinite_at_step: int = 0
    """Fault injection for tests: the loss of this step (on every rank) becomes NaN; 0 = off."""

    fault: Literal["none", "kill", "stall"] = "none"
    """Fault injection for tests: at --debug.fault_at_step, --debug.fault_rank kills itself
    (SIGKILL) or stalls (sleeps in place of the step's collectives, ignoring SIGTERM), in the
    first attempt of an elastic job only (TORCHELASTIC_RESTART_COUNT 0), so a restart runs
    clean."""

    fault_rank: int = 0
    """Global rank that --debug.fault hits."""

    fault_at_step: int = 1
    """Step at whose start --debug.fault hits."""


@dataclass(kw_only=True)
class ProfilingConfig:
    enable: bool = False
    """Trace windows of steps with torch.profiler (CPU, and CUDA on a GPU): one Chrome/Perfetto
    JSON per rank at <dump_folder>/profile_traces/step-N/rank<R>.json, N the window's last step."""

    freq: int = 100
    """Profile the last warmup_steps + active_steps steps of every this many steps."""

    warmup_steps: int = 3
    """Steps the profiler runs before each recorded window and discards (its start-up cost)."""

    active_steps: int = 1
    """Steps each trace records."""

    enable_memory_snapshot: bool = False
    """On CUDA: record the allocator's history and write it (a pickle for
    pytorch.org/memory_viz) to <dump_folder>/memory_snapshot/step-N/rank<R>.pickle every
    memory_snapshot_freq steps and on an out-of-memory error. On CPU: the profiler's traces
    record memory instead (with --profiling.enable)."""

    memory_snapshot_freq: int = 100
    """Steps between memory snapshots."""


@dataclass(kw_only=True)
class ActivationCheckpointConfig:
    mode: Literal["none", "full", "selective"] = "none"
    """none, full (recompute every block), or selective (see selective_* fields)."""

    selective_layer_freq: int = 0
    """Selective by layer: checkpoint every k-th block (k >= 1); 0 = selective by op instead."""


@dataclass(kw_only=True)
class CompileConfig:
    enable: bool = False
    """torch.compile each transformer block (the whole model under tensor parallel)."""

    cache_dir: str | None = None
    """Inductor cache directory (TORCHINDUCTOR_CACHE_DIR), to pay each first compile once."""


@dataclass(kw_only=True)
class Float8Config:
    enable: bool = False
    """Train linear layers in float8 through torchao (dims divisible by 16, 32 for mxfp8; not
    the output layer)."""

    recipe: Literal["tensorwise", "rowwise", "mxfp8"] = "tensorwise"
    """Scaling: tensorwise, one scale per tensor (under tensor + sequence parallel it all-gathers
    float8 activations: CUDA only); rowwise, per row (more accurate, slower); mxfp8, one
    power-of-two scale per 32 elements (needs a Blackwell GPU, compute capability >= 10.0, or
    --float8.emulate; no tensor parallel; linears with a bias stay high precision)."""

    enable_fsdp_float8_all_gather: bool = False
    """All-gather FSDP shards in float8 (tensorwise only): half the all-gather bytes of bf16."""

    emulate: bool = False
    """Emulate the float8/MXFP8 matmuls in high precision on the quantized values, on any
    device: slow, for checking numerics only."""


LoRATarget = Literal["q", "k", "v", "o", "gate", "up", "down"]
"""Projections LoRA can adapt, by their role in a Llama-like block (attention q/k/v/o, MLP
gate/up/down)."""


@dataclass(kw_only=True)
class LoRAConfig:
    rank: int = 0
    """LoRA rank r of the adapters (Hu et al. 2021); 0 = LoRA off, train every weight."""

    alpha: float = 16.0
    """Scale of the adapters' output: y = W·x + alpha/rank · B·A·x."""

    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""

    targets: list[LoRATarget] = field(default_factory=lambda: ["q", "k", "v", "o"])
    """Projections of every block to adapt: q, k, v, o, gate, up, down (in TOML an array)."""

    save_adapters_only: bool = False
    """Checkpoints hold the adapters (and their optimizer state) only; the frozen base comes
    from where the run started (seed, Hugging Face weights or --checkpoint.initial_load_path)
    on resume."""


@dataclass(kw_only=True)
class FaultToleranceConfig:
    enable: bool = False
    """Fault-tolerant replica groups through torchft (pip install tetrad[ft]): this job is one
    replica group of an HSDP run; groups average gradients through torchft's Manager, and one
    that fails rejoins, recovering the weights from a live group, while the others go on."""

    replica_id: int = 0
    """This replica group's index, 0 .. group_count - 1."""

    group_count: int = 1
    """Replica groups the run is planned with (each a separate job, e.g. a torchrun)."""

    min_replica_size: int = 1
    """Fewest replica groups that may take a step together."""

    lighthouse: str | None = None
    """The torchft lighthouse's address (http://host:29510); default: $TORCHFT_LIGHTHOUSE."""

    timeout_seconds: int = 60
    """Timeout of the quorum and of the cross-group collectives."""


@dataclass(kw_only=True)
class Config:
    """The whole job. Section names are the CLI prefixes: --training.steps=10."""

    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(
        default_factory=ActivationCheckpointConfig
    )
    compile: CompileConfig = field(default_factory=CompileConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
