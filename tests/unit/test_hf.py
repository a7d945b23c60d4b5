"""The Hugging Face backend in one process: numerics against transformers itself, the config as
the truth, FLOPs as for llama3, and one-line errors."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tetrad.components.hf_checkpoint import load_hf_weights
from tetrad.components.loss import IGNORE_INDEX, cross_entropy_sum
from tetrad.config import ConfigError, load_config
from tetrad.data import build_tokenizer
from tetrad.errors import CheckpointError
from tetrad.models import get_model_spec
from tetrad.models.hf import (
    HFStateDictAdapter,
    build_hf_model,
    check_parallelism,
    count_params,
    resolve_hf_config,
)
from tetrad.models.hf import num_flops_per_token as hf_flops
from tetrad.models.hf.config import import_transformers
from tetrad.models.llama3 import Llama3Config, Llama3StateDictAdapter
from tetrad.models.llama3.model import num_flops_per_token as llama3_flops

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_tiny", REPO / "scripts/make_tiny_hf_model.py")
assert _spec is not None and _spec.loader is not None
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

NATIVE = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: make_tiny.make_tiny_hf_model(root / f, f) for f in [*NATIVE, "gemma", "gpt2"]}


def resolve(folder: Path, *args: str):
    config = load_config(["--model.name=hf", f"--model.hf_path={folder}", *args])
    return resolve_hf_config(config, vocab_size=build_tokenizer(str(folder)).vocab_size)


def check_layout(folder: Path, *args: str) -> None:
    """The checks the trainer makes of a layout before building anything."""
    config = load_config(["--model.name=hf", f"--model.hf_path={folder}", *args])
    check_parallelism(resolve(folder, *args), config)


def load_weights(folder: Path, *args: str) -> torch.nn.Module:
    """The folder's weights loaded as the trainer loads them: meta build, then the load."""
    model_config = resolve(folder, *args)
    with torch.device("meta"):
        model = build_hf_model(model_config)
    model.to_empty(device="cpu")
    model.init_buffers()
    load_hf_weights(model, folder, HFStateDictAdapter(model_config))
    return model


def load_pair(folder: Path, *args: str):
    """tetrad's model and transformers' own, holding the folder's weights."""
    model_config = resolve(folder, *args)
    model = build_hf_model(model_config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    hf_state = hf.state_dict()
    adapter = HFStateDictAdapter(model_config)
    state = {fqn: hf_state[adapter.hf_keys(fqn)[0]] for fqn in model.state_dict()}
    model.load_state_dict(state)
    model.init_buffers()
    return model, hf.train()


@pytest.mark.parametrize("family", [*NATIVE, "gemma", "gpt2"])
def test_loss_matches_transformers(family: str, folders: dict[str, Path]) -> None:
    model, hf = load_pair(folders[family])
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 64))
    labels = torch.cat([tokens[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    loss = cross_entropy_sum(model(tokens), labels) / (labels != IGNORE_INDEX).sum()
    want = hf(input_ids=tokens, labels=tokens).loss  # transformers shifts the labels itself
    assert abs(loss.item() - want.item()) <= 1e-5, (loss.item(), want.item())
    # Explicit positions (pipeline stages, context parallel) give the same logits.
    positions = torch.arange(64).expand(2, -1)
    torch.testing.assert_close(model(tokens, positions=positions), model(tokens))


@pytest.mark.parametrize("family", NATIVE)
def test_packed_documents_give_transformers_logits_of_each_alone(
    family: str, folders: dict[str, Path]
) -> None:
    """Document ids reach every HF attention layer through the decoder layers' keyword
    arguments: three packed documents, each against transformers' model run on it alone."""
    model, hf = load_pair(folders[family])
    torch.manual_seed(0)
    lengths = (20, 30, 14)
    tokens = torch.randint(0, model.config.vocab_size, (1, sum(lengths)))
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    with torch.no_grad():
        packed = model(tokens, document_ids=ids)
        alone = [hf(input_ids=piece).logits for piece in tokens.split(lengths, dim=1)]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)


def test_export_keys_are_the_safetensors_keys(folders: dict[str, Path]) -> None:
    from safetensors import safe_open

    model_config = resolve(folders["qwen3"])
    with torch.device("meta"):
        model = build_hf_model(model_config)
    adapter = HFStateDictAdapter(model_config)
    with safe_open(folders["qwen3"] / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert {key for fqn in model.state_dict() for key in adapter.hf_keys(fqn)} == stored
    assert adapter.hf_config()["num_hidden_layers"] == 2


def test_config_json_is_the_truth_and_overrides_are_explicit(folders: dict[str, Path]) -> None:
    overrides = "--model.hf_overrides=num_hidden_layers=1,rms_norm_eps=1e-5"
    model_config = resolve(folders["llama"], overrides, "--model.hf_init=random")
    assert model_config.n_layers == 1 and model_config.hf_config.rms_norm_eps == 1e-5
    assert model_config.overrides == {"num_hidden_layers": 1, "rms_norm_eps": 1e-5}
    assert (model_config.dim, model_config.n_heads, model_config.kv_heads) == (64, 4, 2)
    assert resolve(folders["llama"]).init == "pretrained"  # the folder holds weights
    assert model_config.hf_config._attn_implementation == "sdpa"
    assert model_config.hf_config.use_cache is False
    assert build_tokenizer(str(folders["llama"])).chat_template == make_tiny.CHAT_TEMPLATE
    # Pretrained weights for two layers do not silently lose one.
    with pytest.raises(
        CheckpointError,
        match=r"9 checkpoint tensors have no place in the model \(e\.g\. model\.layers\.1\.",
    ) as err:
        load_weights(folders["llama"], overrides)
    assert "\n" not in str(err.value) and "--model.hf_overrides" in str(err.value)
    with pytest.raises(
        ConfigError, match="has no field 'num_hiden_layers'; did you mean num_hidden_layers"
    ):
        resolve(folders["llama"], "--model.hf_overrides=num_hiden_layers=1")


def test_tokenizer_defaults_to_the_model_folder(folders: dict[str, Path]) -> None:
    config = load_config(["--model.name=hf", f"--model.hf_path={folders['qwen2']}"])
    spec = get_model_spec("hf")
    assert spec.default_tokenizer is not None
    assert spec.default_tokenizer(config) == str(folders["qwen2"])


def test_unsupported_architecture_is_one_line_error(tmp_path: Path) -> None:
    transformers.BertConfig(vocab_size=8192, architectures=["BertForMaskedLM"]).save_pretrained(
        tmp_path
    )
    config = load_config(["--model.name=hf", f"--model.hf_path={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        resolve_hf_config(config, vocab_size=100)
    message = str(err.value)
    assert "\n" not in message
    assert "['BertForMaskedLM'] has no *ForCausalLM class" in message
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in message


def test_other_architectures_train_with_fsdp_only(folders: dict[str, Path]) -> None:
    assert resolve(folders["gemma"]).architecture == "GemmaForCausalLM"
    with pytest.raises(
        ConfigError,
        match=re.escape("GemmaForCausalLM is not yet supported for --parallelism.tp > 1"),
    ):
        check_layout(folders["gemma"], "--parallelism.tp=2")
    with pytest.raises(
        ConfigError,
        match=re.escape("GemmaForCausalLM is not yet supported for --parallelism.pp > 1"),
    ):
        check_layout(folders["gemma"], "--parallelism.pp=2")


def test_sliding_window_shorter_than_the_sequence_is_an_error(tmp_path: Path) -> None:
    folder = make_tiny.make_tiny_hf_model(tmp_path, "mistral", weights=False, sliding_window=32)
    with pytest.raises(
        ConfigError, match=re.escape("--training.seq_len 64 exceeds the model's sliding_window 32")
    ):
        resolve(folder, "--training.seq_len=64")
    assert resolve(folder, "--training.seq_len=32").init == "random"  # no weights in the folder


@pytest.mark.parametrize("family", NATIVE)
def test_count_params_matches_the_model(family: str, folders: dict[str, Path]) -> None:
    model_config = resolve(folders[family])
    with torch.device("meta"):
        model = build_hf_model(model_config)
    assert count_params(model_config)["total"] == sum(p.numel() for p in model.parameters())


def test_flops_per_token_as_for_llama3(tmp_path: Path) -> None:
    # llama3's tiny shape: SwiGLU width 32·ceil(int(8·64/3) / 32) = 192.
    llama3 = Llama3Config(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=8192, multiple_of=32
    )
    folder = make_tiny.make_tiny_hf_model(tmp_path, "llama", weights=False, intermediate_size=192)
    assert hf_flops(resolve(folder), 128) == llama3_flops(llama3, 128)


@pytest.mark.parametrize("name", ["qwen2.5_7b", "llama3.2_1b_hf"])
def test_example_configs_load(name: str) -> None:
    config = load_config(["--config", str(REPO / "configs" / f"{name}.toml")])
    assert config.model.name == "hf" and config.model.hf_init == "pretrained"
    assert config.model.hf_path in ("Qwen/Qwen2.5-7B", "meta-llama/Llama-3.2-1B")


@pytest.mark.parametrize(
    ("name", "config", "published"),
    [
        (
            "Qwen2.5-7B",
            transformers.Qwen2Config(
                hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                max_position_embeddings=131072, tie_word_embeddings=False,
                architectures=["Qwen2ForCausalLM"],
            ),
            7.62e9,
        ),
        (
            "Llama-3.2-1B",
            transformers.LlamaConfig(
                hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                head_dim=64, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
            ),
            1.24e9,
        ),
    ],
    ids=["qwen2.5_7b", "llama3.2_1b"],
)  # fmt: skip
def test_published_sizes_from_config_json(name, config, published, tmp_path: Path) -> None:
    config.save_pretrained(tmp_path)  # config.json only: built on meta, nothing allocated
    model_config = resolve_hf_config(
        load_config(["--model.name=hf", f"--model.hf_path={tmp_path}"]), vocab_size=8192
    )
    assert model_config.init == "random"
    with torch.device("meta"):
        model = build_hf_model(model_config)
    total = count_params(model_config)["total"]
    assert total == sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(published, rel=5e-3), name


def test_overrides_rederive_dependent_fields(folders: dict[str, Path], tmp_path: Path) -> None:
    llama = resolve(
        folders["llama"], "--model.hf_overrides=hidden_size=128", "--model.hf_init=random"
    )
    assert (llama.dim, llama.head_dim, llama.hf_config.head_dim) == (128, 32, 32)
    # An explicit head_dim wins, and Qwen3's head_dim is a field of its own, not derived.
    both = "--model.hf_overrides=hidden_size=128,head_dim=64"
    assert resolve(folders["llama"], both, "--model.hf_init=random").head_dim == 64
    qwen3 = resolve(
        folders["qwen3"], "--model.hf_overrides=hidden_size=128", "--model.hf_init=random"
    )
    assert qwen3.head_dim == 16
    folder = make_tiny.make_tiny_hf_model(tmp_path, "qwen2", weights=False, num_hidden_layers=4)
    qwen2 = resolve(folder, "--model.hf_overrides=num_hidden_layers=2")
    assert qwen2.n_layers == 2 and len(qwen2.hf_config.layer_types) == 2
    with torch.device("meta"):
        assert len(build_hf_model(qwen2).layers) == 2
    # transformers' own validation of the rebuilt config, as a one-line error.
    with pytest.raises(
        ConfigError, match=r"not a multiple of the number of attention heads"
    ) as err:
        resolve(folders["llama"], "--model.hf_overrides=num_attention_heads=3")
    assert "\n" not in str(err.value)


def test_tied_checkpoint_may_store_the_output_copy(tmp_path: Path) -> None:
    folder = make_tiny.make_tiny_hf_model(tmp_path, "llama", tie_word_embeddings=True)
    state = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model = load_weights(folder)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_missing_tensors_are_one_line_error(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = make_tiny.make_tiny_hf_model(tmp_path, "llama")
    state = load_file(folder / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"1 model tensors are missing from it \(e\.g\. model\.norm\.weight\)"
    ):
        load_weights(folder)


def test_context_parallel_and_document_masks_reject_attention_dropout(
    folders: dict[str, Path],
) -> None:
    dropout = "--model.hf_overrides=attention_dropout=0.1"
    with pytest.raises(ConfigError, match=r"pass --model.hf_overrides attention_dropout=0$"):
        check_layout(folders["llama"], dropout, "--parallelism.cp=2")
    with pytest.raises(ConfigError, match="which packed documents' block-causal attention"):
        check_layout(folders["llama"], dropout, "--data.format=chat")
    assert resolve(folders["llama"], dropout).hf_config.attention_dropout == 0.1


def test_missing_transformers_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package imports as
    with pytest.raises(ConfigError, match=r"^the hf backend needs transformers: pip install"):
        import_transformers()


def test_llama3_adapter_unknown_fqn_is_config_error() -> None:
    adapter = Llama3StateDictAdapter(Llama3Config(dim=64, n_layers=2, n_heads=4, vocab_size=256))
    assert adapter.hf_keys("layers.0.attention.wq.weight") == [
        "model.layers.0.self_attn.q_proj.weight"
    ]
    with pytest.raises(CheckpointError, match=r"'layers\.0\.extra\.weight' has no Hugging Face"):
        adapter.hf_keys("layers.0.extra.weight")
