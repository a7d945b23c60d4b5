"""The Trainer: builds every piece in the order of the data flow, then runs the loop.

It wires things together and implements no parallelism: the model family's ``parallelize_fn``
applies TP → activation checkpointing → compile → FSDP from outside the model, to the whole model
or, under pipeline parallel, to each of this rank's stages (``distributed/pipeline.py``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from tetrad.components.checkpoint import CheckpointManager
from tetrad.components.checkpoint_folder import resume_source, will_load_model
from tetrad.components.checkpoint_states import TrainState, merged_view
from tetrad.components.expert_balance import ExpertBalance
from tetrad.components.hf_checkpoint import load_hf_weights
from tetrad.components.loss import cross_entropy_sum
from tetrad.components.lr_scheduler import build_lr_scheduler
from tetrad.components.metrics import MetricsLogger, host_memory_gib, memory_gib, peak_tflops
from tetrad.components.optimizer import build_optimizer
from tetrad.components.phases import PhaseTimeline
from tetrad.components.profiling import Profiling
from tetrad.components.validation import Validator
from tetrad.components.wandb_sink import WandbSink
from tetrad.config import (
    Config,
    ConfigError,
    changed_options,
    config_to_dict,
    save_config,
    validate_device,
)
from tetrad.data import (
    IGNORE_INDEX,
    Batch,
    TextDataLoader,
    build_dataloader,
    build_tokenizer,
    document_positions,
    format_shares,
)
from tetrad.data.chat import chat_template_for
from tetrad.data.holdout import training_holdout, validation_data
from tetrad.distributed import flight_recorder
from tetrad.distributed.context_parallel import ContextParallel
from tetrad.distributed.fault_injection import maybe_inject_fault
from tetrad.distributed.fault_tolerance import ReplicaGroups, data_shard
from tetrad.distributed.hang import stop_watching
from tetrad.distributed.init import (
    device_capability,
    device_type,
    init_distributed,
    set_collective_timeout,
    set_determinism,
)
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.pipeline import Pipeline
from tetrad.distributed.stop_signals import StopSignals
from tetrad.distributed.utils import clip_grad_norm_, local_numel, reduce_sum
from tetrad.errors import RunStopped
from tetrad.models.build import attention_for, build_meta_model
from tetrad.models.materialize import init_adapters, materialize_and_init, materialize_for_loading
from tetrad.models.registry import get_model_spec
from tetrad.models.spec import DecoderModel, ModelSpec
from tetrad.tools.logging import init_logging, open_log_files
from tetrad.tools.progress import heartbeat

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What a step's caller needs: its global loss and gradient norm, whether the update was
    applied (both finite), whether the ranks agreed to stop after it, and whether the replica
    groups committed it (torchft; else it is redone)."""

    loss: float
    grad_norm: float
    finite: bool
    stop: bool
    committed: bool = True
    routing: dict[str, float] = field(default_factory=dict)
    """A mixture of experts' balance figures (``ExpertBalance.end_step``); empty if dense."""


class Trainer:
    def __init__(self, config: Config) -> None:
        self.config = config
        validate_device(config, device_type(), device_capability())
        set_determinism(config.debug.seed, config.debug.deterministic)
        self.dump_folder = Path(config.job.dump_folder)
        flight_recorder.enable(
            config.comm.flight_recorder_entries, self.dump_folder, cuda=device_type() == "cuda"
        )
        self.device = init_distributed(
            config.comm.init_timeout_seconds,
            cpu_collectives=config.training.enable_cpu_offload,
        )
        self.rank = dist.get_rank()
        init_logging(
            self.rank, all_ranks=config.debug.log_all_ranks, log_dir=self.dump_folder / "logs"
        )
        self.phases = PhaseTimeline(
            self.dump_folder / "logs" / f"phases_rank{self.rank}.jsonl",
            self.rank,
            watch_compile=config.compile.enable,
        )
        self.profiling = Profiling(
            config.profiling,
            gc_freq=config.training.gc_freq,
            dump_folder=self.dump_folder,
            rank=self.rank,
            device=self.device,
            phases=self.phases,
        )
        self.parallel_dims = self.build_parallel_dims()
        self.grad_accum_steps = self.parallel_dims.grad_accumulation_steps(config.training)
        self.tokenizer = build_tokenizer(get_model_spec(config.model.name).tokenizer_for(config))
        self.pipeline: Pipeline | None = None
        # Where the run starts from is decided once, before building: a model whose weights a
        # checkpoint will fill is neither initialised nor loaded from Hugging Face first.
        self.resume_from = resume_source(
            config.checkpoint, self.dump_folder / config.checkpoint.folder
        )
        self.context_parallel = (
            ContextParallel(self.parallel_dims.meshes["cp"], config.training.seq_len)
            if self.parallel_dims.cp > 1
            else None
        )
        self.model_parts = self.build_model()
        self.expert_balance = ExpertBalance(
            self.model_parts,
            self.parallel_dims.meshes["dp_cp"],
            self.parallel_dims.meshes["pp"],
            self.device,
        )
        self.optimizer = build_optimizer(self.model_parts, config.optimizer, self.device)
        schedule_steps = config.lr_scheduler.total_steps or config.training.steps
        self.lr_scheduler = build_lr_scheduler(self.optimizer, config.lr_scheduler, schedule_steps)
        self.dataloader = self.build_dataloader()
        self.validator = self.build_validator()
        self.metrics = self.build_metrics()
        self.train_state = TrainState()
        self.stop_signals: StopSignals | None = None
        self._consecutive_skips = 0
        self.checkpointer = CheckpointManager(
            config.checkpoint,
            self.dump_folder / config.checkpoint.folder,
            model_parts=self.model_parts,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            dataloader=self.dataloader,
            train_state=self.train_state,
            total_steps=config.training.steps,
            hf_adapter=self.hf_adapter,
            tokenizer=self.tokenizer,
            chat_template=chat_template_for(config.data, self.tokenizer),
            adapters_only=config.lora.save_adapters_only,
            data_ranks=self.parallel_dims.meshes["dp"].size(),
        )
        began = self.phases.clock()
        self.checkpointer.load(self.resume_from)
        if self.resume_from is not None:
            self.phases.record("checkpoint_load", self.train_state.step, began)
        self.replicas = self.build_replica_groups()
        set_collective_timeout(
            config.comm.train_timeout_seconds, self.parallel_dims.meshes.values()
        )
        open_log_files()  # the run has started: from here on, it writes into its folder
        if self.rank == 0:
            previous = self.dump_folder / "config.toml"
            if previous.is_file() and (changes := changed_options(config, previous)):
                logger.info(
                    "options changed since the last start in this folder: %s", ", ".join(changes)
                )
            save_config(config, self.dump_folder / "config.toml")
            if config.job.print_config:
                logger.info("config:\n%s", (self.dump_folder / "config.toml").read_text())

    def build_parallel_dims(self) -> ParallelDims:
        dims = ParallelDims.from_config(self.config.parallelism, dist.get_world_size())
        dims.meshes  # noqa: B018 - create every process group now, at start-up
        if dims.fsdp_enabled:
            logger.info(
                "FSDP over %d ranks, reshard after forward: %s",
                dims.meshes["fsdp"].size(), self.config.parallelism.fsdp_reshard_after_forward,
            )  # fmt: skip
        if dims.ep_enabled:
            logger.info(
                "expert parallel over %d ranks; experts' FSDP over %d",
                dims.ep, dims.meshes["efsdp"].size(),
            )  # fmt: skip
        return dims

    def build_model(self) -> list[DecoderModel]:
        """Build on meta, [split into pipeline stages], parallelize each part
        (``build_meta_model``), materialise on the device, initialise every weight. Returns the
        model parts this rank holds."""
        begin = time.perf_counter()
        built = build_meta_model(
            self.config,
            self.parallel_dims,
            vocab_size=self.tokenizer.vocab_size,
            attention=attention_for(self.config, self.context_parallel, self.device.type),
        )
        spec, self.model_config, model_name = built.spec, built.model_config, built.model_name
        self.hf_adapter = (
            spec.state_dict_adapter(self.model_config) if spec.state_dict_adapter else None
        )
        self.flops_per_token, total_params = built.flops_per_token, built.total_params
        parts, plan = built.parts, built.plan
        if will_load_model(self.config.checkpoint, self.resume_from):
            materialize_for_loading(parts, self.device)  # the checkpoint fills every weight
        elif (weights := self._hf_weights_folder(spec)) is not None:
            self._load_hf_weights(parts, weights)
        else:
            with torch.device("meta"):
                reference = spec.build_model(self.model_config)
            materialize_and_init(parts, reference, device=self.device, seed=self.config.debug.seed)
        if self.config.lora.rank > 0:  # whatever filled the base; a checkpoint may overwrite them
            init_adapters(parts, device=self.device, seed=self.config.debug.seed)
        for part in parts:
            part.train()
        if plan is not None:
            self.pipeline = Pipeline(
                parts, plan, self.parallel_dims.meshes["pp"], self.device, self._pipeline_loss
            )
        # This rank's parameters: its shards (FSDP, TP) of its pipeline stage's.
        num_params = sum(local_numel(p) for part in parts for p in part.parameters())
        if self.config.lora.rank > 0:
            trainable = sum(
                local_numel(p) for part in parts for p in part.parameters() if p.requires_grad
            )
            logger.info(
                "LoRA rank %d on %s: %d trainable parameters of %d (%.2f%%, this rank)",
                self.config.lora.rank, ",".join(self.config.lora.targets), trainable, num_params,
                100 * trainable / num_params,
            )  # fmt: skip
        device_peak = (
            f", device {memory_gib(self.device):.2f} GiB" if self.device.type == "cuda" else ""
        )
        logger.info(
            "model %s/%s: %s parameters, %s on this rank; %.1f MFLOP/token; built in %.1f s, "
            "peak memory: host %.2f GiB%s",
            self.config.model.name, model_name, f"{total_params:,}", f"{num_params:,}",
            self.flops_per_token / 1e6, time.perf_counter() - begin, host_memory_gib(), device_peak,
        )  # fmt: skip
        return parts

    def _hf_weights_folder(self, spec: ModelSpec[Any]) -> Path | None:
        """The Hugging Face folder to start from: --checkpoint.initial_load_path with
        --checkpoint.initial_load_in_hf, else the family's own pretrained weights (an HF model's
        folder); None = initialise from the seed. A checkpoint in the run's own folder still
        takes precedence: the checkpoint manager loads it over these weights."""
        c = self.config.checkpoint
        if not c.initial_load_in_hf:
            return spec.weights_folder(self.model_config) if spec.weights_folder else None
        if self.hf_adapter is None:
            raise ConfigError(
                f"{spec.name} has no Hugging Face state-dict adapter: "
                "--checkpoint.initial_load_in_hf is not available for it"
            )
        assert c.initial_load_path is not None  # validate_config: initial_load_in_hf needs it
        return Path(c.initial_load_path)

    def _load_hf_weights(self, parts: list[DecoderModel], folder: Path) -> None:
        """Pretrained weights in place of initialisation: allocate, recompute the buffers that
        no checkpoint holds (rotary tables), read each rank's shards from the safetensors."""
        materialize_for_loading(parts, self.device)
        logger.info("loading Hugging Face weights from %s", folder)
        assert self.hf_adapter is not None
        load_hf_weights(merged_view(parts), folder, self.hf_adapter)

    def build_replica_groups(self) -> ReplicaGroups | None:
        """torchft's replica groups (``--fault_tolerance.enable``): a group that recovers takes
        every state of a live group but the data position, its own."""
        if not self.config.fault_tolerance.enable:
            return None
        states = self.checkpointer.states
        return ReplicaGroups(
            self.config.fault_tolerance,
            device=self.device,
            model_parts=self.model_parts,
            states={name: state for name, state in states.items() if name != "dataloader"},
            step=self.train_state.step,
        )

    def build_dataloader(self) -> TextDataLoader:
        dp_mesh = self.parallel_dims.meshes["dp"]
        # Under torchft each replica group reads a part of the data of its own.
        dp_rank, dp_size = data_shard(
            self.config.fault_tolerance, dp_mesh.get_local_rank(), dp_mesh.size()
        )
        return build_dataloader(
            self.config.data,
            tokenizer=self.tokenizer,
            seq_len=self.config.training.seq_len,
            batch_size=self.config.training.local_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_size,
            seed=self.config.debug.seed,
            holdout=training_holdout(self.config.validation),
        )

    def build_validator(self) -> Validator | None:
        """Every dp rank reads the whole global validation batch and evaluates its rows, in
        micro-batches as in training (``tetrad.components.validation``)."""
        if not self.config.validation.enable:
            return None
        data, holdout = validation_data(self.config.data, self.config.validation)
        local_batch, dp_mesh = (
            self.config.training.local_batch_size,
            self.parallel_dims.meshes["dp"],
        )

        def build_loader() -> TextDataLoader:
            return build_dataloader(
                data,
                tokenizer=self.tokenizer,
                seq_len=self.config.training.seq_len,
                batch_size=local_batch * dp_mesh.size() * self.grad_accum_steps,
                dp_rank=0,
                dp_world_size=1,
                seed=self.config.debug.seed,
                holdout=holdout,
            )

        return Validator(
            self.config.validation,
            build_loader,
            dp_rank=dp_mesh.get_local_rank(),
            local_batch_size=local_batch,
            micro_batches=self.grad_accum_steps,
            loss_mesh=self.parallel_dims.meshes["dp_cp"],
            device=self.device,
        )

    def build_metrics(self) -> MetricsLogger:
        self.dump_folder.mkdir(parents=True, exist_ok=True)
        m = self.config.metrics
        return MetricsLogger(
            dump_folder=self.dump_folder,
            device=self.device,
            flops_per_token=self.flops_per_token,
            peak_tflops=peak_tflops(self.device, m.peak_tflops),
            enable_tensorboard=m.enable_tensorboard,
            write=self.rank == 0,
            wandb=(
                WandbSink(m, self.dump_folder, config_to_dict(self.config))
                if m.enable_wandb and self.rank == 0
                else None
            ),
        )

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16 autocast for GPU runs that FSDP's mixed precision does not already cover."""
        bf16 = self.config.training.mixed_precision_param == "bfloat16"
        if self.device.type == "cuda" and bf16 and not self.parallel_dims.fsdp_enabled:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Accumulate gradients over the micro-batches; return the global mean loss."""
        prepared = [self._prepare(batch) for batch in micro_batches]
        num_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels, _ in prepared)
        loss_mesh = self.parallel_dims.meshes["dp_cp"]
        global_tokens = reduce_sum(torch.tensor(float(num_tokens), device=self.device), loss_mesh)
        # Data-parallel gradient reduction averages over dp×cp ranks; scaling by that degree
        # turns the average into the sum of every token's gradient / all tokens.
        scale = self.parallel_dims.loss_parallel_degree / global_tokens
        # --debug.nonfinite_at_step: this step's loss and gradients become NaN on every rank.
        poison_at = self.config.debug.nonfinite_at_step
        poison = float("nan") if poison_at and self.train_state.step == poison_at else 1.0
        scale = scale * poison
        loss_sum = torch.zeros((), device=self.device)
        # An MoE's balance loss is a sum over sequences: averaged over the global batch's.
        sequences = sum(inputs.shape[0] for inputs, _, _ in prepared)
        aux_scale = self.parallel_dims.loss_parallel_degree / (sequences * self.parallel_dims.dp)
        self.expert_balance.begin_step(sequences, aux_scale)
        if self.pipeline is not None:
            # Only the rank with the last stage sees losses: sum them over the pipeline too.
            self._loss_scale = scale
            for inputs, labels, kwargs in prepared:
                with self._train_context():
                    loss_sum += self.pipeline.step(inputs, labels, kwargs)
            loss_sum = reduce_sum(loss_sum / scale, self.parallel_dims.meshes["pp"])
            return reduce_sum(loss_sum, loss_mesh) / global_tokens * poison
        (model,) = self.model_parts
        for i, (inputs, labels, kwargs) in enumerate(prepared):
            self._set_gradient_sync(last=i == len(prepared) - 1)
            with self._train_context():
                with self._autocast():
                    logits = model(inputs, **kwargs)
                loss = cross_entropy_sum(logits, labels)
                (loss * scale).backward()
            loss_sum += loss.full_tensor() if isinstance(loss, DTensor) else loss.detach()
        return reduce_sum(loss_sum, loss_mesh) / global_tokens * poison

    def validation_loss_sum(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's summed token loss on ``batch`` and its target-token count, forward only:
        the pipeline's eval schedule, or each model part in eval mode (no dropout)."""
        inputs, labels, kwargs = self._prepare(batch)
        tokens = (labels != IGNORE_INDEX).sum().to(torch.float32)
        for part in self.model_parts:
            part.eval()
        try:
            with torch.no_grad(), self._train_context():
                if self.pipeline is not None:
                    self._loss_scale = torch.ones((), device=self.device)
                    loss = self.pipeline.evaluate(inputs, labels, kwargs)
                    return reduce_sum(loss, self.parallel_dims.meshes["pp"]), tokens
                (model,) = self.model_parts
                with self._autocast():
                    logits = model(inputs, **kwargs)
                loss = cross_entropy_sum(logits, labels)
                return (loss.full_tensor() if isinstance(loss, DTensor) else loss), tokens
        finally:
            for part in self.model_parts:
                part.train()

    def _prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's inputs and labels [B, T] of ``batch`` on the device, and the model's
        keyword arguments: ``positions`` [B, T], rotary-table rows where they are not simply
        0..T-1 or the model cannot see T (packed documents restart them; context parallel
        holds two non-contiguous chunks of each sequence; a later pipeline stage receives
        hidden states that sequence parallel has cut along T), and the whole sequence's
        ``document_ids`` [B, T] for block-causal attention. All [B, ...], so pipeline
        micro-batching splits them with the batch."""
        batch = batch.to(self.device)
        kwargs: dict[str, torch.Tensor] = {}
        positions = None
        if batch.document_ids is not None:
            kwargs["document_ids"] = batch.document_ids
            positions = document_positions(batch.document_ids)
        elif self.context_parallel is not None or self.pipeline is not None:
            positions = torch.arange(batch.inputs.shape[1], device=self.device)
            positions = positions.expand_as(batch.inputs)
        inputs, labels = batch.inputs, batch.labels
        if self.context_parallel is not None:
            shard = self.context_parallel.shard
            assert positions is not None
            inputs, labels, positions = shard(inputs), shard(labels), shard(positions)
        if positions is not None:
            kwargs["positions"] = positions
        return inputs, labels, kwargs

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss per pipeline micro-batch, scaled as in forward_backward."""
        return cross_entropy_sum(logits, labels) * self._loss_scale

    def _train_context(self) -> contextlib.AbstractContextManager[None]:
        """What forward and backward run under: loss parallel, when the TP plan leaves the
        logits vocab-sharded."""
        if self.parallel_dims.tp > 1 and self.config.parallelism.enable_loss_parallel:
            return loss_parallel()
        return contextlib.nullcontext()

    def _set_gradient_sync(self, last: bool) -> None:
        # FSDP2 reduce-scatters gradients only on the last micro-batch of a step.
        for part in self.model_parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(last)

    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        """Forward, backward, clip; the optimizer and LR schedule step only if the loss and the
        gradient norm are finite. Reads the step's figures in one host sync, with the agreed
        stop request (``StopSignals``); that sync ends the forward_backward phase (on a GPU it
        waits for all of the above: ``tetrad.components.phases``)."""
        step = self.train_state.step
        with self.phases.phase("forward_backward", step):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.forward_backward(micro_batches)
            if self.replicas is not None:
                self.replicas.average_gradients()
                if not self.replicas.commit():
                    self.expert_balance.discard()
                    return StepResult(
                        float(loss), math.nan, finite=False, stop=False, committed=False
                    )
            max_norm = self.config.training.max_norm
            grad_norm = clip_grad_norm_(
                [p for part in self.model_parts for p in part.parameters() if p.grad is not None],
                max_norm if max_norm > 0 else float("inf"),
                pp_mesh=self.parallel_dims.meshes["pp"],
            )
            stop = self.stop_signals.requested() if self.stop_signals else torch.zeros_like(loss)
            # Loss and norm are global (reduced over every rank), so every rank decides alike.
            loss_value, norm_value, stop_value = torch.stack(
                [loss.float(), grad_norm.float(), stop.float()]
            ).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            with self.phases.phase("optimizer", step):
                self.optimizer.step()
                self.lr_scheduler.step()
        routing = self.expert_balance.end_step(update=finite)  # an MoE's bias update, figures
        return StepResult(
            loss_value, norm_value, finite=finite, stop=stop_value > 0, routing=routing
        )

    def train(self) -> None:
        t = self.config.training
        if self.config.checkpoint.create_seed_checkpoint:
            self.checkpointer.save_seed()
            return
        dims = self.parallel_dims
        logger.info(
            "training %d steps: %d sequences × %d tokens per rank per micro-batch, "
            "%d micro-batch(es) per step, dp %d, cp %d",
            t.steps, t.local_batch_size, t.seq_len // dims.cp, self.grad_accum_steps, dims.dp,
            dims.cp,
        )  # fmt: skip
        data_iter = iter(self.dataloader)
        state, first_step = self.train_state, self.train_state.step + 1
        self.metrics.start(after_step=state.step)
        self.stop_signals = StopSignals(self.config.job.stop_signals, self.device)
        self.profiling.start(first_step)
        try:
            while state.step < t.steps:
                if self.replicas is not None:
                    self.replicas.start_step()  # may recover every state but the data's
                state.step += 1
                maybe_inject_fault(self.config.debug, state.step)
                lr = float(self.lr_scheduler.get_last_lr()[0])
                with self.phases.phase("data_wait", state.step):
                    micro_batches = [next(data_iter) for _ in range(self.grad_accum_steps)]
                warm_up = self.config.compile.enable and state.step == first_step
                with heartbeat("compiling (first step)", enabled=warm_up):
                    result = self.train_step(micro_batches)
                if not result.committed:  # torchft: this step runs again on the next batch
                    state.step -= 1
                    continue
                batch_tokens = sum(batch.inputs.numel() for batch in micro_batches)
                state.tokens_seen += batch_tokens * self.parallel_dims.dp
                self.metrics.add_tokens(batch_tokens // self.parallel_dims.model_parallel_degree)
                if not result.finite:
                    state.skipped_steps += 1
                if (
                    state.step in (first_step, t.steps)
                    or state.step % self.config.metrics.log_freq == 0
                    or not result.finite
                ):
                    self.metrics.log(
                        state.step,
                        loss=result.loss,
                        grad_norm=result.grad_norm,
                        lr=lr,
                        skipped_steps=state.skipped_steps,
                        data_wait_s=self.phases.take("data_wait"),
                        routing=result.routing,
                    )
                    self._log_data_counts()
                self._check_finite(result)
                if self.validator is not None and self.validator.due(state.step, t.steps):
                    with self.phases.phase("validation", state.step) as validation:
                        record = self.validator.evaluate(self.validation_loss_sum)
                    self.metrics.log_validation(state.step, record, seconds=validation.seconds)
                began = self.phases.clock()
                if saved := self.checkpointer.maybe_save(state.step):
                    self.phases.record("checkpoint_save", state.step, began)
                self.profiling.step(state.step)
                if result.stop and state.step < t.steps:
                    self._stop_on_signal(saved)
                    return
            self.checkpointer.wait()
        except torch.OutOfMemoryError as e:
            self.profiling.on_out_of_memory(state.step, e)
            raise
        finally:
            self.stop_signals.restore()
            self.stop_signals = None
            self.metrics.close()
        logger.info(
            "done: %d steps, %d tokens; metrics in %s",
            state.step, state.tokens_seen, self.metrics.jsonl_path,
        )  # fmt: skip

    def _log_data_counts(self) -> None:
        if counts := self.dataloader.source_counts():
            logger.info("data mix, documents read on this rank: %s", format_shares(counts))
        if overlong := self.dataloader.overlong_counts():
            logger.info(
                "chat data on this rank: %d conversations truncated, %d dropped "
                "(longer than seq_len + 1 = %d tokens, --data.overlong %s)",
                *overlong, self.config.training.seq_len + 1, self.config.data.overlong,
            )  # fmt: skip

    def _check_finite(self, result: StepResult) -> None:
        """--training.on_nonfinite: a non-finite step stops the run (``RunStopped``, exit code
        3), or with ``skip`` only after max_consecutive_skips of them in a row."""
        t, step = self.config.training, self.train_state.step
        if result.finite:
            self._consecutive_skips = 0
            return
        self._consecutive_skips += 1
        what = f"step {step}: non-finite loss {result.loss} or grad_norm {result.grad_norm}"
        if t.on_nonfinite == "skip" and self._consecutive_skips < t.max_consecutive_skips:
            logger.warning(
                "%s: update skipped (%d in a row; the run stops at %d)",
                what, self._consecutive_skips, t.max_consecutive_skips,
            )  # fmt: skip
            return
        skipping = t.on_nonfinite == "skip"
        in_a_row = f" ({self._consecutive_skips} steps in a row)" if skipping else ""
        or_else = (
            "raise --training.max_consecutive_skips"
            if skipping
            else "pass --training.on_nonfinite skip"
        )
        raise RunStopped(
            f"{what}{in_a_row}; stopped before applying its update. "
            f"{self.checkpointer.last_good()}. Lower --optimizer.lr, clip with "
            f"--training.max_norm, or {or_else}"
        )

    def _stop_on_signal(self, saved: bool) -> None:
        """Every rank stops after the same step; the checkpoint of that step makes the next
        start in this folder resume exactly there."""
        step = self.train_state.step
        if self.config.checkpoint.enable and not saved:
            self.checkpointer.save(step)
        self.checkpointer.wait()
        received = self.stop_signals.received if self.stop_signals else None
        logger.info(
            "stopped after step %d on a stop signal (%s). %s; run the same command to resume",
            step, received or "received by another rank", self.checkpointer.last_good(),
        )  # fmt: skip

    def close(self) -> None:
        """Destroy every process group and collect what referenced them (the async save's
        finished work, staged tensors) while the interpreter is fully alive: gloo objects freed
        during interpreter teardown can abort the process at exit ("terminate called without
        an active exception", seen once in CI with FSDP2 and async checkpoints)."""
        self.profiling.close()
        self.phases.close()
        if self.replicas is not None:
            self.replicas.shutdown()
        stop_watching()
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()
