"""Config loading: precedence, typo detection, type errors, and the CLI's exit codes."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO
from tetrad.config import (
    Config,
    ConfigError,
    load_config,
    save_config,
    validate_config,
    validate_device,
)


def test_defaults() -> None:
    config = load_config([])
    assert config == Config()
    assert config.model.name == "llama3" and config.model.flavor == "debug"
    assert config.job.dump_folder == "outputs"
    assert config.parallelism.dp_shard == -1


def test_toml_then_cli_precedence(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[training]\nsteps = 7\nseq_len = 32\n[optimizer]\nlr = 0.5\n[data]\ntokenizer = "x"\n'
    )
    config = load_config(["--config", str(toml), "--training.steps=9", "--optimizer.lr", "1e-4"])
    assert config.training.steps == 9  # CLI beats TOML
    assert config.training.seq_len == 32  # TOML beats default
    assert config.optimizer.lr == pytest.approx(1e-4)
    assert config.data.tokenizer == "x"
    assert config.training.local_batch_size == Config().training.local_batch_size


def test_value_forms() -> None:
    config = load_config(
        ["--compile.enable", "--debug.deterministic=false", "--lr_scheduler.decay_ratio=0.2"]
    )
    assert config.compile.enable is True
    assert config.debug.deterministic is False
    assert config.lr_scheduler.decay_ratio == pytest.approx(0.2)
    assert load_config(["--lr_scheduler.decay_ratio=none"]).lr_scheduler.decay_ratio is None


def test_lists_and_dicts(tmp_path) -> None:
    overrides = 'num_hidden_layers=2, layer_types=["full_attention","full_attention"],act="a,b",x=y'
    config = load_config(
        [f"--model.hf_overrides={overrides}", "--checkpoint.exclude_from_loading=optimizer"]
    )
    assert config.model.hf_overrides == {
        "num_hidden_layers": 2,
        "layer_types": ["full_attention", "full_attention"],
        "act": "a,b",
        "x": "y",
    }
    assert config.checkpoint.exclude_from_loading == ["optimizer"]
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[model]\nhf_overrides = {hidden_size = 64, rope_scaling = {type = "linear"}}\n'
        '[checkpoint]\nexclude_from_loading = ["optimizer", "dataloader"]\n'
    )
    config = load_config(["--config", str(toml)])
    assert config.model.hf_overrides == {"hidden_size": 64, "rope_scaling": {"type": "linear"}}
    assert config.checkpoint.exclude_from_loading == ["optimizer", "dataloader"]
    # The strings of config.toml files saved before these were lists still load.
    toml.write_text('[model]\nhf_overrides = ""\n[checkpoint]\nexclude_from_loading = "model"\n')
    config = load_config(["--config", str(toml)])
    assert config.model.hf_overrides == {} and config.checkpoint.exclude_from_loading == ["model"]


def test_saved_config_round_trips(tmp_path) -> None:
    config = load_config(
        [
            "--training.steps=3",
            "--data.path=/tmp/x.jsonl",
            "--checkpoint.exclude_from_loading=optimizer,dataloader",
            "--model.hf_overrides=num_hidden_layers=2,eos_token_id=[1,2],hidden_act=gelu",
        ]
    )
    save_config(config, tmp_path / "config.toml")
    assert tomllib.loads((tmp_path / "config.toml").read_text())["training"]["steps"] == 3
    assert load_config(["--config", str(tmp_path / "config.toml")]) == config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--training.stepz=3"],
            "unknown config key --training.stepz; did you mean --training.steps?",
        ),
        (["--trainig.steps=3"], "did you mean --training.steps?"),
        (["--training.steps=abc"], "--training.steps: expected an integer, got 'abc'"),
        (["--lr_scheduler.decay_type=exp"], "'exp' is not one of: linear, cosine, sqrt"),
        (["--optimizer.lr"], "--optimizer.lr needs a value"),
        (["positional"], "unexpected argument 'positional'"),
        (
            ["--checkpoint.exclude_from_loading=model,optim"],
            "--checkpoint.exclude_from_loading: 'optim' is not one of: model, optimizer,",
        ),
        (["--model.hf_overrides=a=1,oops"], "--model.hf_overrides: 'oops' is not key=value"),
        (["--model.hf_overrides=a=null"], "--model.hf_overrides: 'a=null': TOML has no null"),
        (["--training.step=3"], "did you mean --training.steps?"),  # no prefix abbreviations
    ],
)
def test_bad_keys_and_values(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(argv)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_typo_in_toml_file(tmp_path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("[optimiser]\nlr = 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(["--config", str(toml)])
    assert str(info.value) == (
        f"{toml}: unknown config key optimiser.lr; did you mean optimizer.lr?"
    )
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", str(tmp_path / "missing.toml")])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--training.steps=0"], "--training.steps must be positive"),
        (["--training.steps=5", "--lr_scheduler.warmup_steps=6"], "warmup_steps 6 must be within"),
        (["--lr_scheduler.decay_ratio=1.5"], "decay_ratio must be within 0..1"),
        (["--parallelism.tp=0"], "--parallelism.tp must be >= 1"),
        (["--comm.flight_recorder_entries=-1"], "flight_recorder_entries must be >= 0 (0 = off)"),
        (
            ["--optimizer.state_dtype=bfloat16", "--optimizer.implementation=fused"],
            "drop --optimizer.implementation=fused",
        ),
        (
            ["--parallelism.cp=2", "--training.seq_len=62"],
            "--training.seq_len 62 is not divisible by 2 × cp = 4",
        ),
        (["--checkpoint.load_step=0"], "--checkpoint.load_step acts on the run's own"),
        (["--checkpoint.last_save_in_hf"], "add --checkpoint.enable"),
        (["--checkpoint.initial_load_in_hf"], "needs --checkpoint.initial_load_path"),
        (["--parallelism.enable_async_tp"], "enable_async_tp needs --compile.enable"),
        (
            ["--parallelism.enable_async_tp", "--compile.enable"],
            "--parallelism.enable_async_tp needs --parallelism.tp > 1",
        ),
        (
            [
                "--float8.enable",
                "--float8.recipe=rowwise",
                "--float8.enable_fsdp_float8_all_gather",
            ],
            "--float8.enable_fsdp_float8_all_gather needs --float8.recipe tensorwise",
        ),
        (
            ["--float8.enable", "--float8.recipe=mxfp8", "--parallelism.tp=2"],
            "--float8.recipe mxfp8 does not support --parallelism.tp > 1",
        ),
        (
            [
                "--float8.enable",
                "--float8.recipe=mxfp8",
                "--training.seq_len=64",
                "--parallelism.cp=4",
            ],
            "--training.seq_len 64 must be divisible by 32 × cp = 128",
        ),
        (["--profiling.freq=0"], "--profiling.freq must be positive, got 0"),
        (
            ["--profiling.freq=4", "--profiling.warmup_steps=3", "--profiling.active_steps=2"],
            "warmup_steps 3 + active_steps 2 must fit in --profiling.freq 4",
        ),
        (["--training.gc_freq=-1"], "--training.gc_freq must be >= 0"),
    ],
)
def test_bad_combinations(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        validate_config(load_config(argv))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


_MXFP8 = ["--float8.enable", "--float8.recipe=mxfp8"]
_TENSORWISE_SP = ["--float8.enable", "--parallelism.tp=2"]  # sequence parallel is on by default
_ASYNC_TP = ["--parallelism.enable_async_tp", "--compile.enable", "--parallelism.tp=2"]


@pytest.mark.parametrize(
    ("argv", "device", "capability", "message"),
    [
        (_ASYNC_TP, "cpu", None, "enable_async_tp needs CUDA GPUs (symmetric memory), not cpu"),
        (_ASYNC_TP, "cuda", (9, 0), None),
        (_TENSORWISE_SP, "cpu", None, "which gloo cannot carry on cpu"),
        ([*_TENSORWISE_SP, "--parallelism.enable_sequence_parallel=false"], "cpu", None, None),
        (_TENSORWISE_SP, "cuda", (9, 0), None),
        (_MXFP8, "cpu", None, "mxfp8 needs an NVIDIA Blackwell GPU (compute capability >= 10.0)"),
        (
            _MXFP8,
            "cuda",
            (9, 0),
            "mxfp8 needs an NVIDIA Blackwell GPU (compute capability >= 10.0), not compute capability 9.0",
        ),
        (_MXFP8, "cuda", (10, 0), None),
        ([*_MXFP8, "--float8.emulate"], "cpu", None, None),
    ],
)
def test_device_rules(
    argv: list[str], device: str, capability: tuple[int, int] | None, message: str | None
) -> None:
    config = load_config(argv)
    validate_config(config)
    if message is None:
        validate_device(config, device, capability)
        return
    with pytest.raises(ConfigError) as info:
        validate_device(config, device, capability)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("schedule", "pp", "want"),
    [
        ("1F1B", 2, True),
        ("ZBVZeroBubble", 2, False),
        ("DualPipeV", 2, False),
        ("DualPipeV", 1, True),
    ],
)
def test_fsdp_reshard_after_forward_is_decided_by_the_schedule(
    schedule: str, pp: int, want: bool
) -> None:
    layout = [f"--parallelism.pp_schedule={schedule}", f"--parallelism.pp={pp}"]
    config = load_config(layout)
    validate_config(config)
    assert config.parallelism.fsdp_reshard_after_forward is want
    if not want:  # asking for what the schedule cannot take is an error, not overridden
        with pytest.raises(ConfigError, match=r"drop --parallelism\.fsdp_reshard_after_forward"):
            validate_config(load_config([*layout, "--parallelism.fsdp_reshard_after_forward"]))


def test_checkpoint_options_that_fit() -> None:
    validate_config(
        load_config(
            [
                "--checkpoint.enable",
                "--checkpoint.load_step=4",
                "--checkpoint.last_save_in_hf",
                "--checkpoint.exclude_from_loading=optimizer, dataloader",
            ]
        )
    )
    validate_config(load_config(["--checkpoint.create_seed_checkpoint", "--parallelism.tp=2"]))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tetrad.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_error_is_one_line_with_exit_2() -> None:
    result = _cli("train", "--training.stpes=5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tetrad: error: unknown config key --training.stpes; did you mean --training.steps?"
    ]


def test_cli_help_lists_every_field() -> None:
    result = _cli("train", "--help")
    assert result.returncode == 0
    import dataclasses

    config = Config()
    for section in dataclasses.fields(config):
        for f in dataclasses.fields(getattr(config, section.name)):
            assert f"--{section.name}.{f.name} " in result.stdout
    assert "Number of optimizer steps." in result.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path) -> None:
    validate_config(load_config(["--config", str(path)]))


def test_subcommands_share_the_parser() -> None:
    from tetrad.cli import _without_launch_options, build_parser

    parser = build_parser()
    args = parser.parse_args(["convert", "a", "b", "--dtype=bfloat16", "--model.flavor=tiny"])
    assert (args.src, args.dst, args.dtype, vars(args)["model.flavor"]) == (
        "a",
        "b",
        "bfloat16",
        "tiny",
    )
    with pytest.raises(
        ConfigError, match=r"unknown config key --training.steps; see `tetrad convert"
    ):
        parser.parse_args(["convert", "a", "b", "--training.steps=3"])
    with pytest.raises(ConfigError, match=r"^--nproc: needs a positive integer, got '0'$"):
        parser.parse_args(["train", "--nproc=0"])
    argv = ["--nproc", "2", "--debug.deterministic", "--nproc=4", "--training.steps", "3"]
    argv += ["--max-restarts", "1", "--max-restarts=2"]
    assert _without_launch_options(argv) == ["--debug.deterministic", "--training.steps", "3"]
