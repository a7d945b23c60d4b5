"""`tetrad train --dry-run`: every shipped config builds at its intended world size, and the
405B at 512 ranks (pp 8 × dp_shard 8 × tp 8) holds what its arithmetic says. In-process: each
rank is a fake process group, created and destroyed around its build."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import transformers

from tetrad.config import ConfigError, load_config
from tetrad.data.tokenizer import DEFAULT_TOKENIZER
from tetrad.plan.dry_run import RankSummary, dry_run

REPO = Path(__file__).resolve().parents[2]

# The world size each config's header comment names.
WORLD_SIZES = {
    "llama3.2_1b_hf": 8,
    "llama3_405b": 512,
    "llama3_70b": 32,
    "llama3_8b": 8,
    "llama3_debug": 2,
    "qwen2.5_7b": 8,
    "qwen3_moe_debug": 2,
    "sft_debug": 1,
    "sft_qwen3": 8,
}

# The hub models' published config.json, so the HF configs dry-run without the network.
HF_CONFIGS = {
    "meta-llama/Llama-3.2-1B": transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=131072, architectures=["LlamaForCausalLM"],
    ),
    "Qwen/Qwen2.5-7B": transformers.Qwen2Config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072,
        tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"],
    ),
    "Qwen/Qwen3-0.6B": transformers.Qwen3Config(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        max_position_embeddings=40960, architectures=["Qwen3ForCausalLM"],
    ),
}  # fmt: skip


def test_every_config_is_listed() -> None:
    assert sorted(WORLD_SIZES) == sorted(p.stem for p in (REPO / "configs").glob("*.toml"))


def _model_folder(hub_id: str, tmp_path: Path) -> Path:
    """config.json (no weights) and the embedded tokenizer in a local folder."""
    HF_CONFIGS[hub_id].save_pretrained(tmp_path)
    shutil.copy(DEFAULT_TOKENIZER, tmp_path / "tokenizer.json")
    return tmp_path


@pytest.mark.parametrize("name", sorted(WORLD_SIZES))
def test_config_dry_runs(name: str, tmp_path: Path) -> None:
    args = ["--config", str(REPO / "configs" / f"{name}.toml")]
    config = load_config(args)
    if config.model.hf_path is not None:  # a hub id: its config.json, offline
        folder = _model_folder(config.model.hf_path, tmp_path)
        config = load_config([*args, f"--model.hf_path={folder}", "--model.hf_init=random"])
    world_size = WORLD_SIZES[name]
    summaries = dry_run(config, world_size)
    assert [s.rank for s in summaries] == sorted({0, world_size - 1})
    for s in summaries:
        # Without pipeline parallel each rank holds 1/world_size of every parameter (FSDP and TP
        # shards, rounded up per tensor), and Adam two fp32 moments of it.
        assert s.local_params * world_size == pytest.approx(s.total_params, rel=0.01), name
        assert s.optimizer_state_bytes == 2 * 4 * s.local_params


@pytest.fixture(scope="module")
def llama3_405b_pp8() -> list[RankSummary]:
    config = load_config(
        [
            "--config", str(REPO / "configs" / "llama3_405b.toml"),
            "--parallelism.pp=8", "--parallelism.dp_shard=8", "--parallelism.tp=8",
            "--parallelism.pp_layers_per_stage=16", "--training.local_batch_size=8",
        ]
    )  # fmt: skip
    return dry_run(config, 512, ranks=[0, 64, 511])


def test_405b_on_512_ranks(llama3_405b_pp8: list[RankSummary]) -> None:
    first, second, last = llama3_405b_pp8
    assert first.total_params == 405_853_388_800  # Llama 3.1 405B as published
    assert (first.coordinates, last.coordinates["pp"]) == (
        {"pp": 0, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 0},
        7,
    )
    assert last.coordinates == {"pp": 7, "dp_replicate": 0, "dp_shard": 7, "cp": 0, "tp": 7}
    # 126 layers in stages of 16: the last stage holds 14.
    assert first.layers == [str(i) for i in range(16)]
    assert second.layers == [str(i) for i in range(16, 32)]
    assert last.layers == [str(i) for i in range(112, 126)]
    # A block: dim 16384, 128 heads of 128 (8 kv heads), FFN 53248: its matrices split over
    # dp_shard 8 × tp 8, its two norms over dp_shard only (replicated across tp).
    dim, kv, ffn, vocab = 16384, 8 * 128, 53248, 128256
    block = (2 * dim * dim + 2 * kv * dim + 3 * dim * ffn) // 64 + 2 * dim // 8
    assert second.local_params == 16 * block
    assert first.local_params == 16 * block + vocab * dim // 64
    assert last.local_params == 14 * block + vocab * dim // 64 + dim // 8
    wq = next(w for w in second.weights if w.name == "layers.16.attention.wq.weight")
    assert (wq.shape, wq.local_shape) == ((dim, dim), (dim // 64, dim))
    assert wq.placements.endswith(" tp:S(0)")  # rows split over tp (and dp_shard)


def test_world_size_that_the_degrees_do_not_make_is_one_line() -> None:
    config = load_config(["--parallelism.tp=8", "--parallelism.dp_shard=8"])
    with pytest.raises(ConfigError, match="≠ world size 48"):
        dry_run(config, 48)


def test_commands_print_their_reports(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI wiring of `tetrad train --dry-run` and `tetrad estimate`, on the tiny model."""
    from tetrad.cli import main

    tiny = ["--model.flavor=tiny", "--training.seq_len=64", "--training.local_batch_size=2"]
    main(["train", "--dry-run", "--world-size=4", "--parallelism.tp=2", *tiny])
    out = capsys.readouterr().out
    assert "on 4 ranks: pp 1 × dp_replicate 1 × dp_shard 2 × cp 1 × tp 2" in out
    assert "rank 3 (pp=0 dp_replicate=0 dp_shard=1 cp=0 tp=1)" in out
    main(["estimate", "--world-size=2", "--gpu-memory-gib=0.001", *tiny])
    out = capsys.readouterr().out
    assert "activations by --activation_checkpoint.mode: none" in out
    assert "does NOT fit in 0.001 GiB per GPU" in out
