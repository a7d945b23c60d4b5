"""Config loading: dataclass defaults ← TOML file ← ``--section.field=value`` overrides.

One path validates keys from TOML and from the command line alike, so a typo in either gives the
same one-line error with a close match, before any process group or model is built.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import textwrap
import tomllib
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from tetrad.config.job_config import SPLIT_BACKWARD_SCHEDULES, CheckpointConfig, Config
from tetrad.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


CHECKPOINT_STATES = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state")
"""The named states of a checkpoint, in the order they are built; --checkpoint.exclude_from_loading
takes these names."""


def parse_exclude(value: str) -> set[str]:
    """``--checkpoint.exclude_from_loading``: comma-separated state names."""
    names = {name.strip() for name in value.split(",") if name.strip()}
    if unknown := sorted(names - set(CHECKPOINT_STATES)):
        raise ConfigError(
            f"--checkpoint.exclude_from_loading: unknown state {unknown[0]!r}; "
            f"the states are {', '.join(CHECKPOINT_STATES)}"
        )
    return names


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


@functools.cache
def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right under a field) of a dataclass, by field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _all_keys() -> list[str]:
    return [
        f"{section}.{f.name}"
        for section, cls in _sections().items()
        for f in dataclasses.fields(cls)
    ]


def _unknown_key(key: str, *, flag: bool) -> ConfigError:
    prefix = "--" if flag else ""
    candidates = _all_keys() if "." in key else list(_sections())
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{match[0]}?" if match else "; see `tetrad train --help`"
    return ConfigError(f"unknown config key {prefix}{key}{hint}")


def _coerce(key: str, raw: Any, annotation: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or explain why it can't be."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        is_none = raw is None or (isinstance(raw, str) and raw.lower() in {"none", "null"})
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, raw, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"--{key}: bad value {raw!r}")
    if origin is typing.Literal:
        if raw in args:
            return raw
        choices = ", ".join(str(a) for a in args)
        raise ConfigError(f"--{key}: {raw!r} is not one of: {choices}")
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"--{key}: expected true or false, got {raw!r}")
    if annotation is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw)
            except ValueError:
                pass
        raise ConfigError(f"--{key}: expected an integer, got {raw!r}")
    if annotation is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise ConfigError(f"--{key}: expected a number, got {raw!r}")
    if annotation is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"--{key}: expected a string, got {raw!r}")
    raise TypeError(f"config field {key} has an unsupported type {annotation!r}")


def _parse_cli(argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """Split argv into the --config path and ``section.field -> raw string`` overrides."""
    config_path: str | None = None
    overrides: dict[str, str] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--"):
            raise ConfigError(
                f"unexpected argument {arg!r}; options look like --section.field=value"
            )
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            nxt = items[i + 1] if i + 1 < len(items) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            elif key != "config" and _is_bool_field(key):
                value = "true"  # a bare flag switches a boolean on
            else:
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
        key = key.replace("-", "_")
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
        i += 1
    return config_path, overrides


def _is_bool_field(key: str) -> bool:
    section, _, name = key.replace("-", "_").partition(".")
    cls = _sections().get(section)
    return cls is not None and _field_types(cls).get(name) is bool


def _apply(config: Config, key: str, raw: Any, *, flag: bool) -> None:
    section, _, name = key.partition(".")
    cls = _sections().get(section)
    if cls is None or name not in _field_types(cls):
        raise _unknown_key(key, flag=flag)
    setattr(getattr(config, section), name, _coerce(key, raw, _field_types(cls)[name]))


def _flatten_toml(data: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for section, values in data.items():
        if not isinstance(values, dict):
            raise (
                _unknown_key(section, flag=False)
                if section not in _sections()
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


def load_config(argv: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file named by --config, then the command-line overrides."""
    config_path, overrides = _parse_cli(argv)
    config = Config()
    if config_path is not None:
        try:
            for key, value in _flatten_toml(load_toml(config_path)):
                _apply(config, key, value, flag=False)
        except ConfigError as e:
            raise ConfigError(f"{config_path}: {e}") from None
    for key, value in overrides.items():
        _apply(config, key, value, flag=True)
    return config


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as nested plain values; None fields are left out (TOML has no null)."""
    return {
        section: {
            k: v for k, v in dataclasses.asdict(getattr(config, section)).items() if v is not None
        }
        for section in _sections()
    }


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(tomli_w.dumps(config_to_dict(config)))


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(annotation)) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(annotation, str(annotation))


def help_text(prog: str = "tetrad train") -> str:
    """Every field with its type, default and docstring, grouped by section."""
    lines = [
        f"usage: {prog} [--config FILE.toml] [--section.field=VALUE ...]",
        "",
        "Values: defaults, then --config FILE.toml, then command-line overrides.",
    ]
    defaults = Config()
    for section, cls in _sections().items():
        lines += ["", f"[{section}]"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = f"--{section}.{f.name} {_type_name(_field_types(cls)[f.name])}"
            default = getattr(getattr(defaults, section), f.name)
            lines.append(f"  {flag}  (default: {default})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def validate_config(config: Config) -> None:
    """Checks that need no world size; ParallelDims checks the degrees against it."""
    t, lr = config.training, config.lr_scheduler
    positive = {
        "training.steps": t.steps,
        "training.seq_len": t.seq_len,
        "training.local_batch_size": t.local_batch_size,
        "metrics.log_freq": config.metrics.log_freq,
        "checkpoint.interval": config.checkpoint.interval,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"--{key} must be positive, got {value}")
    if t.global_batch_size != -1 and t.global_batch_size <= 0:
        raise ConfigError(
            f"--training.global_batch_size must be positive or -1, got {t.global_batch_size}"
        )
    schedule_steps = t.steps if lr.total_steps is None else lr.total_steps
    if not 0 <= lr.warmup_steps <= schedule_steps:
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
    _resolve_fsdp_reshard(config)


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
    parse_exclude(c.exclude_from_loading)
    if c.initial_load_in_hf and not c.initial_load_path:
        raise ConfigError("--checkpoint.initial_load_in_hf needs --checkpoint.initial_load_path")
