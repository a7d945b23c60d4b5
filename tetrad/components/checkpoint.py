"""DCP checkpoints of everything a run needs to continue exactly: model, optimizer, LR schedule,
data position, step, tokens seen and RNG, under ``<dump_folder>/checkpoint/step-N``.

Each rank writes its own shards (``torch.distributed.checkpoint``), so a checkpoint loads into
any parallel layout (DCP reshards on load). Crash safety (written as ``step-N.tmp``, marked
``COMPLETE`` and renamed; anything else is reported and skipped) is the folder contract of
``checkpoint_folder`` (as is the choice of the checkpoint a run resumes from); the states
themselves are ``checkpoint_states``. Async saves (``dcp.async_save``) write in a background
thread over a process group of their own, so the collectives of training and of the save never
interleave. Every file is checksummed as it is written (``checkpoint_storage``) and verified
before a load. A save that fails (a full disk, a folder made read-only, a file in the way) is
raised on every rank as one ``RunStopped`` line naming the checkpoint and the OS error, after
rank 0 has removed its ``step-N.tmp``; the checkpoints before it stay as they were. In sync mode
that happens at once, in async mode from ``wait()`` or the next save.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from tetrad.components.checkpoint_folder import (
    base_source,
    check_model_matches,
    checkpoint_problem,
    complete_steps,
    model_keys,
    read_metadata,
    step_folder,
    write_complete,
)
from tetrad.components.checkpoint_states import (
    CHECKPOINT_STATES,
    DataState,
    LoadableTrainState,
    ModelState,
    OptimizerState,
    TrainState,
    merged_view,
)
from tetrad.components.checkpoint_storage import ChecksumWriter, safe_load
from tetrad.components.hf_checkpoint import save_hf_weights
from tetrad.components.lr_scheduler import follow_current_schedule
from tetrad.config.job_config import CheckpointConfig, CheckpointState
from tetrad.data.tokenizer import Tokenizer
from tetrad.errors import CheckpointError, ConfigError, RunStopped
from tetrad.models.lora import is_adapter
from tetrad.models.spec import StateDictAdapter
from tetrad.tools.progress import progress_bar, ticking

logger = logging.getLogger(__name__)


_DP_RANK_KEY = re.compile(r"^dataloader\.dp_rank_(\d+)\.")


@dataclass
class _PendingSave:
    """An async save in flight; ``finalized`` is set once rank 0 has tried to make it visible,
    ``error`` holds what went wrong then (a done-callback's exception would be swallowed)."""

    future: Future[None]
    step: int
    finalized: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class CheckpointManager:
    """Saves and loads the run's named states; see the module docstring for the folder rules."""

    def __init__(
        self,
        config: CheckpointConfig,
        folder: Path,
        *,
        model_parts: Sequence[nn.Module],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: LambdaLR,
        dataloader: Stateful,
        train_state: TrainState,
        total_steps: int,
        hf_adapter: StateDictAdapter | None = None,
        tokenizer: Tokenizer | None = None,
        chat_template: str | None = None,
        adapters_only: bool = False,
        data_ranks: int | None = None,
    ) -> None:
        """``adapters_only``: the model's part of every save is its LoRA adapters alone.
        ``data_ranks``: the data positions this job saves, one per dp rank (default: the
        loader's dp world size; fewer under torchft, whose replica groups share one world)."""
        self.config = config
        self.hf_adapter = hf_adapter
        self.tokenizer, self.chat_template = tokenizer, chat_template  # for Hugging Face exports
        if config.last_save_in_hf:
            if hf_adapter is None:
                raise ConfigError(
                    "this model family has no Hugging Face state-dict adapter: "
                    "--checkpoint.last_save_in_hf is not available for it"
                )
            hf_adapter.hf_config()  # a model the format cannot hold fails before training
        self.folder = folder
        self.total_steps = total_steps
        self.train_state = train_state
        self.exclude = set(config.exclude_from_loading)
        self.enabled = config.enable or config.create_seed_checkpoint
        self.model = merged_view(model_parts)
        self.device = next(self.model.parameters()).device
        self.lora = any(is_adapter(fqn) for fqn, _ in self.model.named_parameters())
        self.select_saved = is_adapter if adapters_only else None
        self.lr_scheduler = lr_scheduler
        self.states: dict[str, Stateful] = {
            "model": ModelState(self.model, select=self.select_saved),
            "optimizer": OptimizerState(self.model, optimizer),
            "lr_scheduler": lr_scheduler,
            "dataloader": DataState(dataloader),
            "train_state": train_state,
        }
        self.dp_world_size = data_ranks or int(dataloader.state_dict()["dp_world_size"])
        self.rank = dist.get_rank()
        # A group of its own for async saves: its collectives run in a background thread while
        # training's run on the others (on the default group, gloo would mix the two up).
        async_mode = config.async_mode == "async"
        self.group = dist.new_group(backend="gloo") if async_mode and self.enabled else None
        self.pending: _PendingSave | None = None

    # ---- finding and loading ----

    def complete_steps(self, *, report: bool = False) -> list[int]:
        """Steps of the complete checkpoints in the folder, oldest first."""
        return complete_steps(self.folder, report=report)

    def load(self, path: Path | None) -> None:
        """Restore the run's states from ``path`` (``resume_source``'s choice, made once by the
        trainer before it builds the model) after checking that it fits; refuse a run that
        would overwrite checkpoints it does not resume from (judged by the step it starts
        after: the loaded train state's, else 0)."""
        if self.config.create_seed_checkpoint:
            path = None
        if path is None:
            self._check_overwrite(0)
            return
        metadata = read_metadata(path)
        held = {key.split(".", 1)[0] for key in metadata.state_dict_metadata}
        names = [name for name in CHECKPOINT_STATES if name in held and name not in self.exclude]
        model = self._model_to_load(metadata, path, names) if "model" in names else None
        if model is not None:
            self._check_model(model, metadata, path)
        if "dataloader" in names:
            self._check_dp_degree(metadata, path)
        begin = time.perf_counter()
        base_lrs = [
            float(lr) for lr in self.lr_scheduler.base_lrs
        ]  # this run's, before the load replaces them
        states = {name: self.states[name] for name in names}
        if model is not None:
            states["model"] = model
        if "train_state" in states:
            states["train_state"] = LoadableTrainState(self.train_state, metadata)
        safe_load(states, path)
        self._check_overwrite(self.train_state.step)
        # The loaded optimizer and schedule bring the LRs of the run that saved them; this
        # run's options decide the LR from its first step on.
        if changes := follow_current_schedule(self.lr_scheduler, base_lrs):
            logger.info("resumed with a changed LR schedule: %s", "; ".join(changes))
        fresh = [name for name in CHECKPOINT_STATES if name not in names]
        logger.info(
            "resumed from %s in %.1f s (step %d, %d tokens seen)%s",
            path, time.perf_counter() - begin, self.train_state.step, self.train_state.tokens_seen,
            f"; not loaded, starting fresh: {', '.join(fresh)}" if fresh else "",
        )  # fmt: skip

    def _model_to_load(
        self, metadata: Metadata, path: Path, names: list[CheckpointState]
    ) -> ModelState:
        """The part of the model ``path`` fills. A LoRA model takes from a checkpoint of the
        base alone (pre-training) the base only, its adapters, optimizer, schedule, data and
        step starting fresh (those leave ``names``); from one of its adapters alone
        (--lora.save_adapters_only) those, after the base from ``base_source`` (or over the
        seed's or Hugging Face base the trainer filled)."""
        held = model_keys(metadata)
        adapters, base = any(map(is_adapter, held)), not all(map(is_adapter, held))
        if not self.lora or (adapters and base):
            return ModelState(self.model)
        if base:
            # A new run on a pre-trained base: its optimizer (other parameters), schedule,
            # data position and step belong to the pre-training.
            for name in ("optimizer", "lr_scheduler", "dataloader", "train_state"):
                if name in names:
                    names.remove(name)
            return ModelState(self.model, select=_is_base)
        if (source := base_source(self.config, path)) is not None:
            if problem := checkpoint_problem(source, need_marker=False, verify=True):
                raise CheckpointError(f"--checkpoint.initial_load_path {source}: {problem}")
            base_state = ModelState(self.model, select=_is_base)
            self._check_model(base_state, read_metadata(source), source)
            safe_load({"model": base_state}, source)
            logger.info("loaded the frozen base from %s", source)
        return ModelState(self.model, select=is_adapter)

    def _check_model(self, state: ModelState, metadata: Metadata, path: Path) -> None:
        model_state = state.state_dict()
        all_keys: list[set[str]] = [set()] * dist.get_world_size()
        dist.all_gather_object(all_keys, set(model_state))
        check_model_matches(model_state, metadata, path, set().union(*all_keys))

    def _check_dp_degree(self, metadata: Metadata, path: Path) -> None:
        saved = {int(m[1]) for k in metadata.state_dict_metadata if (m := _DP_RANK_KEY.match(k))}
        if len(saved) != self.dp_world_size:
            raise CheckpointError(
                f"checkpoint {path} holds the data position of {len(saved)} data-parallel "
                f"rank(s) but this run has {self.dp_world_size}; a position cannot be split "
                "differently without repeating or skipping data: resume with the same "
                "data-parallel degree, or pass --checkpoint.exclude_from_loading=dataloader "
                "to start the data from the beginning"
            )

    def _check_overwrite(self, start_step: int) -> None:
        """Refuse to start a run that would replace a complete checkpoint it did not start from
        (unless --checkpoint.overwrite)."""
        if not self.enabled or self.config.overwrite:
            return
        existing = set(self.complete_steps())
        if self.config.create_seed_checkpoint:
            planned = {0}
        else:
            planned = {s for s in range(start_step + 1, self.total_steps + 1) if self._due(s)}
        clashes = [step_folder(self.folder, s) for s in sorted(existing & planned)]
        if self.config.last_save_in_hf and self.config.enable:
            clashes += [p for p in [self._hf_folder(self.total_steps)] if p.exists()]
        if clashes:
            raise CheckpointError(
                f"{clashes[0]} exists and this run (starting after step {start_step}) would "
                "overwrite it; resume from it, pass --checkpoint.overwrite to replace it, or use "
                "another --job.dump_folder"
            )

    # ---- saving ----

    def _due(self, step: int) -> bool:
        return step % self.config.interval == 0 or step == self.total_steps

    def maybe_save(self, step: int) -> bool:
        """Save at the interval and at the last step (model only there with
        --checkpoint.last_save_model_only); whether it saved."""
        if not self.config.enable or not self._due(step):
            return False
        last = step == self.total_steps
        if last and self.config.last_save_model_only:
            self.save(step, model_only=True, dtype=getattr(torch, self.config.export_dtype))
        else:
            self.save(step)
        if last and self.config.last_save_in_hf:
            self.export_hf(step)
        return True

    def last_good(self) -> str:
        """Where the run can go on from, for a message: the newest complete checkpoint (after
        the save in flight, if any, is finished)."""
        if not self.config.enable:
            return "No checkpoint (--checkpoint.enable is off)"
        self.wait()
        if steps := self.complete_steps():
            return f"Last good checkpoint: {step_folder(self.folder, steps[-1])}"
        return f"No checkpoint in {self.folder} yet"

    def _hf_folder(self, step: int) -> Path:
        return self.folder / f"step-{step}-hf"

    def export_hf(self, step: int) -> None:
        """The weights as a Hugging Face folder (collective: every rank takes part)."""
        assert self.hf_adapter is not None
        folder = self._hf_folder(step)
        if self.rank == 0 and folder.exists():  # only with --checkpoint.overwrite
            shutil.rmtree(folder)
        dist.barrier()
        begin = time.perf_counter()
        dtype = getattr(torch, self.config.export_dtype)
        save_hf_weights(
            self.model,
            folder,
            self.hf_adapter,
            dtype=dtype,
            tokenizer=self.tokenizer,
            chat_template=self.chat_template,
        )
        logger.info("exported %s in %.2f s", folder, time.perf_counter() - begin)

    def save_seed(self) -> None:
        """The seed checkpoint: the freshly initialised model alone, as step-0, in the model's
        own dtype (never --checkpoint.export_dtype: every layout starts from these exact
        weights). Each rank writes its own shards, so any layout can create it."""
        self.save(0, model_only=True, dtype=None)
        self.wait()

    def save(
        self, step: int, *, model_only: bool = False, dtype: torch.dtype | None = None
    ) -> None:
        """Write step ``step``'s checkpoint (``model_only``: the weights alone, cast to ``dtype``
        if given); async mode returns once the state is copied. Raises a failure of this save
        (sync mode) or of the one before (async mode), on every rank."""
        self.wait()  # one save in flight at a time; raises a failure of the previous one
        self._check_finite(step)
        tmp = step_folder(self.folder, step, tmp=True)
        if self.rank == 0:  # left by a save that did not finish; if it cannot go, the save fails
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        model_state = ModelState(self.model, dtype, self.select_saved)
        states: dict[str, Stateful] = {"model": model_state} if model_only else self.states
        begin = time.perf_counter()
        names = sorted(states)
        if self.group is None:
            error: BaseException | None
            try:
                writer = ChecksumWriter(tmp)
                with ticking(
                    progress_bar(f"saving {step_folder(self.folder, step).name}"), writer.progress
                ):
                    dcp.save(states, storage_writer=writer)
                error = self._finalize(step, begin, time.perf_counter() - begin, names)
            except CheckpointException as e:  # raised on every rank when one rank's write fails
                error = e
            self._raise_on_every_rank(error, step, group=None)
            return
        future = dcp.async_save(
            states, storage_writer=ChecksumWriter(tmp), process_group=self.group
        )
        assert isinstance(future, Future)  # an AsyncSaveResponse only with async staging
        blocked = time.perf_counter() - begin
        pending = self.pending = _PendingSave(future, step)
        if self.rank != 0:
            pending.finalized.set()
            return

        # Rank 0's save ends after every rank's shards and the metadata are written.
        def on_done(f: Future[None]) -> None:
            try:
                pending.error = f.exception() or self._finalize(step, begin, blocked, names)
            finally:
                pending.finalized.set()

        future.add_done_callback(on_done)

    def _check_finite(self, step: int) -> None:
        """Never write non-finite weights (a finite but huge update can overflow them): stop
        instead, on every rank, keeping the checkpoints that exist."""
        finite = torch.ones((), device=self.device)
        for tensor in self.model.state_dict().values():
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if local.is_floating_point():
                finite = finite * torch.isfinite(local).all()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            raise RunStopped(
                f"step {step}: the weights hold non-finite values; not saved. "
                f"{self.last_good()}. Lower --optimizer.lr or clip with --training.max_norm"
            )

    def _finalize(
        self, step: int, begin: float, blocked: float, names: list[str]
    ) -> BaseException | None:
        """Rank 0: marker last, then the rename that makes the checkpoint visible; then trim.
        Returns what went wrong (the caller raises it on every rank)."""
        tmp, final = step_folder(self.folder, step, tmp=True), step_folder(self.folder, step)
        if self.rank == 0:
            try:
                if final.exists():  # only with --checkpoint.overwrite (checked at start-up)
                    shutil.rmtree(final)
                write_complete(tmp, final, step=step, names=names)
                self._purge()
            except Exception as e:
                return e
        logger.info(
            "saved %s: %.2f s, of which training was blocked %.2f s",
            final, time.perf_counter() - begin, blocked,
        )  # fmt: skip
        return None

    def _purge(self) -> None:
        """--checkpoint.keep_latest_k: delete complete checkpoints older than the newest k."""
        k = self.config.keep_latest_k
        if k <= 0:
            return
        for step in self.complete_steps()[:-k]:
            shutil.rmtree(step_folder(self.folder, step))
            logger.info(
                "removed %s (--checkpoint.keep_latest_k %d)", step_folder(self.folder, step), k
            )

    def wait(self) -> None:
        """Wait for the save in flight (async mode) to be written and made visible; raise, on
        every rank, what went wrong with it."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.future.exception()  # every rank's share written (or failed: rank 0 knows)
        pending.finalized.wait()
        self._raise_on_every_rank(pending.error, pending.step, group=self.group)

    def _raise_on_every_rank(
        self, error: BaseException | None, step: int, group: dist.ProcessGroup | None
    ) -> None:
        """Rank 0 tells every rank whether it made step ``step``'s checkpoint visible, so a
        failure stops them all here, with rank 0's one-line reason, rather than leaving the
        others at their next collective. On failure rank 0 first removes the temporary folder
        (every rank is done writing into it)."""
        reason: list[str | None] = [None]
        if self.rank == 0 and error is not None:
            shutil.rmtree(step_folder(self.folder, step, tmp=True), ignore_errors=True)
            reason = [
                f"could not save checkpoint {step_folder(self.folder, step)}: "
                f"{_os_reason(error)}; the checkpoints before it are intact"
            ]
        dist.broadcast_object_list(reason, src=0, group=group)
        if reason[0] is not None:
            raise RunStopped(reason[0]) from error


def _is_base(fqn: str) -> bool:
    return not is_adapter(fqn)


def _os_reason(error: BaseException) -> str:
    """What went wrong, on one line: the first failing rank's exception out of DCP's wrapper."""
    rank = None
    while isinstance(error, CheckpointException) and error.failures:
        rank, (error, _) = min(error.failures.items())
    where = "" if rank is None else f" (rank {rank})"
    return " ".join(f"{error}{where}".split())
