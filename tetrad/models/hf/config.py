"""The Hugging Face config as the truth: read it, apply explicit overrides (logged), and derive
the few fields tetrad needs (dims, layers, heads, vocab, positions) from it.

Nothing here builds a model: ``resolve_hf_config`` turns ``--model.hf_path`` (a local folder or a
hub id) plus ``--model.hf_overrides`` into an ``HFModelConfig`` that the builder, the
parallelize function, the FLOP counter and the state-dict adapter all read.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from huggingface_hub import snapshot_download
from huggingface_hub.errors import StrictDataclassError

from tetrad.config import Config
from tetrad.errors import ConfigError, NetworkError

logger = logging.getLogger(__name__)

# model_type → architecture families whose decoder layers tetrad drives itself (so rotary
# positions reach every pipeline stage and context-parallel rank), with a tensor-parallel plan.
NATIVE_FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Llama-like mixture-of-experts families: driven like the native ones, with each sparse-MoE
# block swapped for tetrad's ``MoE`` layer (tetrad/models/hf/moe.py).
MOE_FAMILIES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
# What a hub download fetches: transformers' weights (not e.g. Mistral's consolidated.safetensors
# copy), config and tokenizer files.
_HUB_PATTERNS = [
    "model*.safetensors",
    "model.safetensors.index.json",
    "*.json",
    "*.jinja",
    "tokenizer.model",
]
# Config fields that __post_init__ derives when they are None (head_dim from the width and
# head count, layer_types from the layer count and window), by the fields they follow.
_DERIVED = {
    "head_dim": ("hidden_size", "num_attention_heads"),
    "layer_types": (
        "num_hidden_layers",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
    ),
}


def import_transformers() -> ModuleType:
    """transformers, an optional dependency: imported only by the hf backend."""
    try:
        import transformers
    except ImportError as err:
        raise ConfigError("the hf backend needs transformers: pip install 'tetrad[hf]'") from err
    return transformers


@dataclass(kw_only=True)
class HFModelConfig:
    """A resolved Hugging Face model: its source, its (overridden) config and how to start."""

    source: str
    """--model.hf_path as given: a folder or a hub id."""

    folder: Path
    """Local folder holding config.json (for a hub id: the downloaded snapshot)."""

    hf_config: Any
    """The ``transformers.PretrainedConfig``, overrides applied, sdpa attention, no KV cache."""

    init: Literal["pretrained", "random"]
    """Load the folder's safetensors, or initialise from the seed."""

    overrides: dict[str, Any]
    """The --model.hf_overrides that were applied, by key."""

    @property
    def architecture(self) -> str:
        return self.hf_config.architectures[0]

    @property
    def native(self) -> bool:
        """Whether tetrad runs the decoder loop itself (TP plan, pipeline, context parallel)."""
        families = NATIVE_FAMILIES | MOE_FAMILIES
        return families.get(self.hf_config.model_type) == self.architecture

    @property
    def moe(self) -> bool:
        """Whether the sparse-MoE blocks are swapped for tetrad's ``MoE`` layer."""
        return MOE_FAMILIES.get(self.hf_config.model_type) == self.architecture

    @property
    def dim(self) -> int:
        return self.hf_config.hidden_size

    @property
    def n_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.n_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The gated MLP's width (intermediate_size)."""
        return self.hf_config.intermediate_size

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.hf_config.max_position_embeddings

    @property
    def tie_embeddings(self) -> bool:
        return bool(getattr(self.hf_config, "tie_word_embeddings", False))

    def hf_dict(self) -> dict[str, Any]:
        """config.json contents for an export: the overridden config, cache use restored."""
        data = self.hf_config.to_dict()
        data["use_cache"] = True
        data.pop("_attn_implementation_autoset", None)
        return data


def apply_overrides(hf_config: Any, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The config rebuilt with the overrides (only keys it already has), logging old → new,
    and the overrides applied. Rebuilt, not patched: fields derived from an overridden one
    (head_dim, layer_types) are derived again unless overridden themselves."""
    applied: dict[str, Any] = {}
    known = hf_config.to_dict()
    for key, value in overrides.items():
        if key not in known:
            match = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {match[0]}?" if match else ""
            raise ConfigError(
                f"--model.hf_overrides: {hf_config.model_type} config has no field {key!r}{hint}"
            )
        logger.info("hf config override: %s = %r (config.json: %r)", key, value, known[key])
        applied[key] = value
    if not applied:
        return hf_config, applied
    cls = type(hf_config)
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    derivable = {f.name for f in fields if f.default is None}
    stale = {
        field
        for field, sources in _DERIVED.items()
        if field in derivable and field not in applied and applied.keys() & set(sources)
    }
    data = {k: v for k, v in known.items() if k not in stale} | applied
    try:
        return cls(**data), applied
    except (StrictDataclassError, TypeError, ValueError) as err:  # transformers' validation
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(f"--model.hf_overrides {overrides}: {reason}") from err


def _local_folder(source: str) -> Path:
    """The folder itself, or a hub id's snapshot (config, tokenizer, safetensors only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")):
        raise ConfigError(f"--model.hf_path {source!r}: not a folder")
    try:
        return Path(snapshot_download(source, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # the hub client raises many types; all mean "cannot fetch it"
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        raise NetworkError(
            f"--model.hf_path {source!r}: not a local folder, and not downloadable from the "
            f"Hugging Face hub ({reason})"
        ) from err


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _WEIGHT_FILES)


def _architecture(hf_config: Any, source: str) -> str:
    transformers = import_transformers()
    supported = ", ".join(NATIVE_FAMILIES.values())
    for name in hf_config.architectures or []:
        if name.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(transformers, name):
            return name
    raise ConfigError(
        f"--model.hf_path {source!r}: architectures {hf_config.architectures} has no "
        f"*ForCausalLM class that transformers {transformers.__version__} knows; "
        f"tetrad trains causal language models (fully supported: {supported})"
    )


def _check_sliding_window(config: Config, hf_config: Any) -> None:
    """tetrad attends causally over the whole sequence; that equals sliding-window attention
    only while the sequence fits in the window."""
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return
    if getattr(hf_config, "use_sliding_window", True) and window:
        seq_len = config.training.seq_len
        if seq_len > window:
            raise ConfigError(
                f"--training.seq_len {seq_len} exceeds the model's sliding_window {window}, "
                "which tetrad does not implement; train with sequences of at most the window"
            )


def resolve_hf_config(config: Config, vocab_size: int) -> HFModelConfig:
    """--model.hf_path/hf_overrides/hf_init → HFModelConfig; one-line ConfigErrors."""
    m = config.model
    if not m.hf_path:
        raise ConfigError("--model.name hf needs --model.hf_path (a folder or a hub id)")
    folder = _local_folder(m.hf_path)
    try:  # never code from the folder: tetrad trains the families transformers ships
        hf_config = import_transformers().AutoConfig.from_pretrained(
            folder, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"--model.hf_path {m.hf_path!r}: cannot read config.json ({err})".splitlines()[0]
        ) from err
    hf_config, overrides = apply_overrides(hf_config, m.hf_overrides)
    hf_config.architectures = [_architecture(hf_config, m.hf_path)]
    hf_config.use_cache = False
    # transformers' SDPA for the families it runs itself; native ones get tetrad's at build.
    hf_config._attn_implementation = "sdpa"
    if m.hf_init == "pretrained" and not has_weights(folder):
        raise ConfigError(
            f"--model.hf_init pretrained: {folder} holds no model.safetensors or "
            "model.safetensors.index.json; use --model.hf_init random to start from scratch"
        )
    init = m.hf_init if m.hf_init != "auto" else "pretrained" if has_weights(folder) else "random"
    if m.hf_init == "auto" and init == "random":
        logger.warning("%s holds no safetensors weights: initialising from the seed", folder)
    resolved = HFModelConfig(
        source=m.hf_path,
        folder=folder,
        hf_config=hf_config,
        init=init,
        overrides=overrides,
    )
    if vocab_size > resolved.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but {resolved.architecture} only "
            f"{resolved.vocab_size} embedding rows; use the model's own tokenizer"
        )
    _check_sliding_window(config, hf_config)
    logger.info(
        "hf model %s (%s): %d layers, dim %d, %d heads (%d kv), vocab %d, %s weights",
        m.hf_path, resolved.architecture, resolved.n_layers, resolved.dim, resolved.n_heads,
        resolved.kv_heads, resolved.vocab_size, init,
    )  # fmt: skip
    return resolved
