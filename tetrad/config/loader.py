"""Config loading: dataclass defaults ← TOML file ← ``--section.field=value`` overrides.

One typed conversion (``args.coerce``) reads TOML and the command line alike, so a typo or a bad
value in either gives the same one-line error with a close match, before any process group or
model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from tetrad.config.args import (
    CONFIG_USAGE,
    ArgumentParser,
    add_config_arguments,
    coerce,
    field_types,
    sections,
    unknown_key,
)
from tetrad.config.job_config import (
    SPLIT_BACKWARD_SCHEDULES,
    V_SCHEDULES,
    CheckpointConfig,
    Config,
    DataConfig,
    LRSchedulerConfig,
    ParallelismConfig,
)
from tetrad.errors import ConfigError


def _keys() -> list[str]:
    return [f"{section}.{name}" for section, cls in sections().items() for name in field_types(cls)]


def _flatten_toml(data: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for section, values in data.items():
        if not isinstance(values, dict):
            raise (
                unknown_key(section, sections(), prefix="")
                if section not in sections()
                else ConfigError(f"[{section}] must be a table of fields")
            )
        for name, value in values.items():
            yield f"{section}.{name}", value


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("no such file (--config)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML ({e})") from None


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the TOML file named by --config, then the options given on the command
    line (``add_config_arguments``'s "section.field" values, already typed)."""
    config, given = Config(), vars(args)
    if (path := given.get("config")) is not None:
        try:
            for key, raw in _flatten_toml(load_toml(path)):
                section, _, name = key.partition(".")
                fields = field_types(sections()[section]) if section in sections() else {}
                if name not in fields:
                    raise unknown_key(key, _keys(), prefix="")
                try:
                    setattr(getattr(config, section), name, coerce(raw, fields[name]))
                except ValueError as e:
                    raise ConfigError(f"--{key}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for key, value in given.items():
        section, dot, name = key.partition(".")
        if dot:
            setattr(getattr(config, section), name, value)
    return config


def saved_run_config(args: argparse.Namespace, run_config: Path) -> Config:
    """The config of a command that reads a run's checkpoint: the run's saved ``run_config``
    (unless --config names a file) under the options given, but the layout only as given
    (--parallelism.*, else the defaults): a checkpoint loads under any layout, and the one to
    use is the command's, not the training run's."""
    if "config" in args or not run_config.is_file():
        return config_from_args(args)
    config = config_from_args(argparse.Namespace(**vars(args), config=str(run_config)))
    given = [key.partition(".")[2] for key in vars(args) if key.startswith("parallelism.")]
    config.parallelism = ParallelismConfig(**{f: getattr(config.parallelism, f) for f in given})
    return config


def load_config(argv: Sequence[str] = ()) -> Config:
    """The config ``tetrad train`` options describe (see ``config_from_args``)."""
    parser = ArgumentParser(prog="tetrad train", usage=f"%(prog)s {CONFIG_USAGE}")
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as nested plain values; None fields are left out (TOML has no null)."""
    return {
        section: {
            k: v for k, v in dataclasses.asdict(getattr(config, section)).items() if v is not None
        }
        for section in sections()
    }


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(config_to_dict(config)))


def changed_options(config: Config, previous: Path) -> list[str]:
    """``--section.key old → new`` for each option that differs from the config saved at
    ``previous`` (the last start in the same run folder), for the log of a resumed run."""
    before = tomllib.loads(previous.read_text())
    after = config_to_dict(config)
    return [
        f"--{section}.{key} {before.get(section, {}).get(key)} → {after.get(section, {}).get(key)}"
        for section in sorted(set(before) | set(after))
        for key in sorted(set(before.get(section, {})) | set(after.get(section, {})))
        if before.get(section, {}).get(key) != after.get(section, {}).get(key)
    ]


def validate_config(config: Config) -> None:
    """Checks that need no world size; ParallelDims checks the degrees against it."""
    _validate_numbers(config)
    if not config.job.dump_folder.strip():
        raise ConfigError("--job.dump_folder is empty; name the run's folder")
    t, lr = config.training, config.lr_scheduler
    positive = {
        "training.steps": t.steps,
        "training.seq_len": t.seq_len,
        "training.local_batch_size": t.local_batch_size,
        "metrics.log_freq": config.metrics.log_freq,
        "checkpoint.interval": config.checkpoint.interval,
        "validation.freq": config.validation.freq,
        "validation.steps": config.validation.steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{key} must be positive, got {value}")
    if config.comm.flight_recorder_entries < 0:
        raise ConfigError(
            "--comm.flight_recorder_entries must be >= 0 (0 = off), got "
            f"{config.comm.flight_recorder_entries}"
        )
    schedule = config.parallelism.pp_schedule
    if config.validation.enable and config.parallelism.pp > 1 and schedule in V_SCHEDULES:
        # torch 2.13's forward-only `eval` still runs the V schedules' local backward hand-offs
        # ("can't steal_bwd_input if this stage doesn't have backward").
        raise ConfigError(
            f"--validation.enable cannot evaluate under --parallelism.pp_schedule {schedule}: "
            "torch's pipeline eval does not run V-shaped schedules; use Interleaved1F1B or "
            "1F1B for runs with validation"
        )
    if not 0 < config.validation.holdout_fraction < 1:
        raise ConfigError(
            "--validation.holdout_fraction must be within (0, 1), got "
            f"{config.validation.holdout_fraction}"
        )
    if t.global_batch_size != -1 and t.global_batch_size <= 0:
        raise ConfigError(
            f"--training.global_batch_size must be positive or -1, got {t.global_batch_size}"
        )
    schedule_steps = t.steps if lr.total_steps is None else lr.total_steps
    # The default warmup is shortened to a shorter schedule (build_lr_scheduler logs it); a
    # warmup the user chose is theirs to fix. A value equal to the default counts as the default.
    explicit = lr.warmup_steps != LRSchedulerConfig().warmup_steps
    if lr.warmup_steps < 0 or (explicit and lr.warmup_steps > schedule_steps):
        raise ConfigError(
            f"--lr_scheduler.warmup_steps {lr.warmup_steps} must be within 0..{schedule_steps}"
            " (the schedule's length: --lr_scheduler.total_steps, else --training.steps)"
        )
    if lr.decay_ratio is not None and not 0.0 <= lr.decay_ratio <= 1.0:
        raise ConfigError(f"--lr_scheduler.decay_ratio must be within 0..1, got {lr.decay_ratio}")
    if not 0.0 <= lr.min_lr_factor <= 1.0:
        raise ConfigError(
            f"--lr_scheduler.min_lr_factor must be within 0..1, got {lr.min_lr_factor}"
        )
    o = config.optimizer
    if o.state_dtype == "bfloat16" and o.implementation != "auto":
        raise ConfigError(
            "--optimizer.state_dtype=bfloat16 has its own per-tensor update; drop "
            f"--optimizer.implementation={o.implementation}"
        )
    ac = config.activation_checkpoint
    if ac.selective_layer_freq < 0:
        raise ConfigError("--activation_checkpoint.selective_layer_freq must be >= 0")
    for name in ("dp_replicate", "tp", "pp", "cp"):
        if getattr(config.parallelism, name) < 1:
            raise ConfigError(f"--parallelism.{name} must be >= 1")
    cp = config.parallelism.cp
    if t.seq_len % (2 * cp):
        raise ConfigError(
            f"--training.seq_len {t.seq_len} is not divisible by 2 × cp = {2 * cp}: context "
            "parallel cuts every sequence into 2·cp equal chunks"
        )
    pp = config.parallelism
    if pp.pp_microbatches == 0 or pp.pp_microbatches < -1:
        raise ConfigError("--parallelism.pp_microbatches must be >= 1, or -1 for one per stage")
    if pp.pp_layers_per_stage is not None and pp.pp_layers_per_stage < 1:
        raise ConfigError("--parallelism.pp_layers_per_stage must be >= 1")
    if config.parallelism.dp_shard == 0 or config.parallelism.dp_shard < -1:
        raise ConfigError("--parallelism.dp_shard must be >= 1, or -1 to fill the world size")
    if config.parallelism.enable_async_tp and not config.compile.enable:
        raise ConfigError(
            "--parallelism.enable_async_tp needs --compile.enable (an Inductor pass does the "
            "overlap)"
        )
    if config.parallelism.enable_async_tp and config.parallelism.tp == 1:
        raise ConfigError("--parallelism.enable_async_tp needs --parallelism.tp > 1")
    _validate_float8(config)
    _validate_checkpoint(config.checkpoint)
    if config.debug.fault_at_step < 1 or config.debug.fault_rank < 0:
        raise ConfigError(
            "--debug.fault_at_step must be >= 1 and --debug.fault_rank >= 0, got "
            f"{config.debug.fault_at_step} and {config.debug.fault_rank}"
        )
    if config.debug.nonfinite_at_step < 0:
        raise ConfigError(
            f"--debug.nonfinite_at_step must be >= 0 (0 = off), got {config.debug.nonfinite_at_step}"
        )
    mix_weights(config.data)
    _validate_profiling(config)
    _validate_lora(config)
    _validate_fault_tolerance(config)
    _resolve_fsdp_reshard(config)
    if config.metrics.enable_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--metrics.enable_wandb needs wandb: pip install 'tetrad[tracking]'")


def _validate_profiling(config: Config) -> None:
    p = config.profiling
    for key in ("freq", "active_steps", "memory_snapshot_freq"):
        if (value := getattr(p, key)) <= 0:
            raise ConfigError(f"--profiling.{key} must be positive, got {value}")
    if p.warmup_steps < 0:
        raise ConfigError(f"--profiling.warmup_steps must be >= 0, got {p.warmup_steps}")
    if p.warmup_steps + p.active_steps > p.freq:
        raise ConfigError(
            f"--profiling.warmup_steps {p.warmup_steps} + active_steps {p.active_steps} must fit "
            f"in --profiling.freq {p.freq}: raise freq or shorten the window"
        )
    if config.training.gc_freq < 0:
        raise ConfigError(
            f"--training.gc_freq must be >= 0 (0 = Python's automatic GC), got {config.training.gc_freq}"
        )


def _validate_fault_tolerance(config: Config) -> None:
    ft = config.fault_tolerance
    if not ft.enable:
        return
    if importlib.util.find_spec("torchft") is None:
        raise ConfigError("--fault_tolerance.enable needs torchft: pip install 'tetrad[ft]'")
    if ft.group_count < 1:
        raise ConfigError(f"--fault_tolerance.group_count must be >= 1, got {ft.group_count}")
    if not 0 <= ft.replica_id < ft.group_count:
        raise ConfigError(
            f"--fault_tolerance.replica_id {ft.replica_id} must be within 0..{ft.group_count - 1}"
            " (--fault_tolerance.group_count groups)"
        )
    if not 1 <= ft.min_replica_size <= ft.group_count:
        raise ConfigError(
            f"--fault_tolerance.min_replica_size {ft.min_replica_size} must be within "
            f"1..{ft.group_count} (--fault_tolerance.group_count)"
        )
    if ft.timeout_seconds <= 0:
        raise ConfigError(
            f"--fault_tolerance.timeout_seconds must be positive, got {ft.timeout_seconds}"
        )
    if not (ft.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")):
        raise ConfigError(
            "--fault_tolerance.enable needs the lighthouse's address: set TORCHFT_LIGHTHOUSE or "
            "--fault_tolerance.lighthouse (start one with: torchft_lighthouse --min_replicas 1)"
        )
    if config.parallelism.pp > 1:
        raise ConfigError(
            "--fault_tolerance.enable does not support pipeline parallel; use --parallelism.pp 1 "
            "inside each replica group"
        )


def _validate_numbers(config: Config) -> None:
    """Values that can only produce garbage: every float option is a finite number >= 0 (none
    has a meaning for NaN, infinity or a negative value; lr 0 has one, weights that stay), and
    the optimizer's own ranges."""
    for section in sections():
        for name, value in dataclasses.asdict(getattr(config, section)).items():
            if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{section}.{name} must be a finite number >= 0, got {value}")
    o = config.optimizer
    for name in ("beta1", "beta2"):
        if getattr(o, name) >= 1:
            raise ConfigError(f"--optimizer.{name} must be within [0, 1), got {getattr(o, name)}")
    if o.eps == 0:
        raise ConfigError("--optimizer.eps must be positive, got 0 (Adam would divide by zero)")


def _resolve_fsdp_reshard(config: Config) -> None:
    """--parallelism.fsdp_reshard_after_forward: decided here, once, from the schedule; the
    trainer logs the resolved value and the run's saved config holds it."""
    p = config.parallelism
    split_backward = p.pp > 1 and p.pp_schedule in SPLIT_BACKWARD_SCHEDULES
    if p.fsdp_reshard_after_forward is None:
        p.fsdp_reshard_after_forward = not split_backward
    elif p.fsdp_reshard_after_forward and split_backward:
        raise ConfigError(
            f"--parallelism.pp_schedule {p.pp_schedule} computes weight gradients after FSDP "
            "would reshard: drop --parallelism.fsdp_reshard_after_forward=true"
        )


def _validate_float8(config: Config) -> None:
    """What torchao 0.18 supports: FSDP's float8 all-gathers scale per tensor; MXFP8 weights
    under tensor parallel's DTensors silently compute in high precision, and MXFP8 scales blocks
    of 32 along every matmul dim, tokens included."""
    f, p = config.float8, config.parallelism
    if not f.enable:
        return
    if f.enable_fsdp_float8_all_gather and f.recipe != "tensorwise":
        raise ConfigError("--float8.enable_fsdp_float8_all_gather needs --float8.recipe tensorwise")
    if f.recipe != "mxfp8":
        return
    if p.tp > 1:
        raise ConfigError(
            "--float8.recipe mxfp8 does not support --parallelism.tp > 1 (torchao's MXFP8 "
            "linears do not quantize DTensors): use --float8.recipe tensorwise or rowwise"
        )
    if config.training.seq_len % (32 * p.cp):
        raise ConfigError(
            f"--float8.recipe mxfp8 scales blocks of 32 tokens: --training.seq_len "
            f"{config.training.seq_len} must be divisible by 32 × cp = {32 * p.cp}"
        )


def _validate_lora(config: Config) -> None:
    """LoRA's own ranges, and the layouts its adapters cannot take yet: tensor parallel would
    shard the rank dimension of A like W's rows; float8 swaps the adapted linears out."""
    lora = config.lora
    if lora.rank < 0:
        raise ConfigError(f"--lora.rank must be >= 0 (0 = off), got {lora.rank}")
    if lora.rank == 0:
        if lora.save_adapters_only:
            raise ConfigError("--lora.save_adapters_only needs LoRA: set --lora.rank > 0")
        return
    if lora.alpha <= 0:
        raise ConfigError(f"--lora.alpha must be positive, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"--lora.dropout must be within [0, 1), got {lora.dropout}")
    if not lora.targets or len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(
            f"--lora.targets must name each projection once, got {','.join(lora.targets) or '[]'}"
        )
    if config.parallelism.tp > 1:
        raise ConfigError(
            "--lora.rank > 0 does not support --parallelism.tp > 1 yet; use FSDP "
            "(--parallelism.dp_shard), which shards the frozen base as well"
        )
    if config.float8.enable:
        raise ConfigError("--lora.rank > 0 does not support --float8.enable yet; drop one of them")
    if lora.dropout > 0 and config.activation_checkpoint.mode != "none":
        raise ConfigError(
            "--lora.dropout > 0 with activation checkpointing would recompute with other dropout "
            "masks: use --lora.dropout 0 or --activation_checkpoint.mode none"
        )


def validate_device(config: Config, device_type: str, capability: tuple[int, int] | None) -> None:
    """Checks that need the device (``cuda`` with its compute capability, or ``cpu``), made
    before any process group starts: what an option needs must exist on it."""
    f, p = config.float8, config.parallelism
    if device_type != "cuda":
        if p.enable_async_tp:
            raise ConfigError(
                "--parallelism.enable_async_tp needs CUDA GPUs (symmetric memory), not "
                f"{device_type}: drop it"
            )
        if f.enable and f.recipe == "tensorwise" and p.tp > 1 and p.enable_sequence_parallel:
            raise ConfigError(
                "float8 tensorwise under sequence parallel all-gathers float8 activations, "
                f"which gloo cannot carry on {device_type}: add "
                "--parallelism.enable_sequence_parallel=false, or use --float8.recipe rowwise"
            )
    if f.enable and f.recipe == "mxfp8" and not f.emulate and (capability or (0, 0)) < (10, 0):
        found = f"compute capability {capability[0]}.{capability[1]}" if capability else device_type
        raise ConfigError(
            "--float8.recipe mxfp8 needs an NVIDIA Blackwell GPU (compute capability >= 10.0), "
            f"not {found}: add --float8.emulate to check its numerics (slow), or use tensorwise"
        )


def _validate_checkpoint(c: CheckpointConfig) -> None:
    """The checkpoint options' own rules; the model family's HF adapter is checked at run
    time."""
    own = {"load_step": c.load_step != -1, "last_save_in_hf": c.last_save_in_hf}
    if not c.enable and (name := next((n for n, used in own.items() if used), None)):
        raise ConfigError(
            f"--checkpoint.{name} acts on the run's own checkpoints: add --checkpoint.enable"
        )
    if c.initial_load_in_hf and not c.initial_load_path:
        raise ConfigError("--checkpoint.initial_load_in_hf needs --checkpoint.initial_load_path")


def mix_weights(data: DataConfig) -> dict[str, float]:
    """--data.mix as {source: weight} in the order given ({} without one); whether each source
    exists is for the data layer to find out."""
    if data.mix is None:
        return {}
    if data.path is not None or data.dataset != "default":
        raise ConfigError(
            "--data.mix names its own sources; drop --data.path and --data.dataset (put a file, "
            "folder or hub name in the mix)"
        )
    weights: dict[str, float] = {}
    for item in filter(None, (item.strip() for item in data.mix.split(","))):
        name, colon, raw = (part.strip() for part in item.rpartition(":"))
        if not colon or not name:
            raise ConfigError(f"--data.mix item {item!r} is not source:weight")
        if name == "local":
            raise ConfigError("--data.mix: name the local file or folder itself, not 'local'")
        try:
            weight = float(raw)
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(
                f"--data.mix weight of {name!r} must be a positive number, got {raw!r}"
            )
        if name in weights:
            raise ConfigError(f"--data.mix names {name!r} twice")
        weights[name] = weight
    if not weights:
        raise ConfigError('--data.mix is empty; give "source:weight,source:weight"')
    return weights
