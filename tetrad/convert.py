"""``tetrad convert SRC DST [--dtype D] [model options]``: a model's weights between a DCP
checkpoint and a Hugging Face folder, in the direction the source's format implies.

A DCP source (a ``step-N`` folder) becomes safetensors + ``config.json`` that
``transformers.AutoModelForCausalLM.from_pretrained`` reads (a LoRA run's adapters merged into
the weights they adapt); a Hugging Face source becomes a
model-only DCP checkpoint that ``--checkpoint.initial_load_path`` starts a run from. The model
is the run's: ``--model.*`` and ``--data.tokenizer`` (its vocabulary size) as for ``tetrad
train``, taken by default from the ``config.toml`` of the run a DCP source belongs to. The Hugging
Face folder also gets that tokenizer, with the chat template the run used (``--data.format``,
``--data.chat_template``; see ``chat_template_for``), so ``AutoTokenizer`` loads it. One process,
no process group; nothing is written when the input is wrong.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from tetrad.components.checkpoint_folder import (
    check_model_matches,
    checkpoint_problem,
    model_keys,
    read_metadata,
    write_complete,
)
from tetrad.components.checkpoint_states import ModelState
from tetrad.components.checkpoint_storage import ChecksumWriter, safe_load
from tetrad.components.hf_checkpoint import load_hf_weights, save_hf_weights
from tetrad.config import config_from_args
from tetrad.data import build_tokenizer
from tetrad.data.chat import chat_template_for
from tetrad.errors import CheckpointError, ConfigError, reported
from tetrad.models.lora import apply_lora, is_adapter
from tetrad.models.materialize import materialize_for_loading
from tetrad.models.registry import get_model_spec


def convert(args: argparse.Namespace) -> None:
    """``args``: SRC, DST and --dtype, with the model's options as ``add_config_arguments``
    parses them."""
    src, dst, dtype = Path(args.src), Path(args.dst), args.dtype
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; remove it or choose another destination")
    to_hf = (src / ".metadata").is_file()
    if not to_hf and not (src / "config.json").is_file():
        raise CheckpointError(
            f"{src} is neither a DCP checkpoint (.metadata) nor a Hugging Face folder (config.json)"
        )
    run_config = src.parent.parent / "config.toml"
    if to_hf and "config" not in args and run_config.is_file():
        args.config = str(run_config)
    config = config_from_args(args)
    spec = get_model_spec(config.model.name)
    if spec.state_dict_adapter is None:
        raise ConfigError(f"model family {spec.name} has no Hugging Face state-dict adapter")
    tokenizer = build_tokenizer(spec.tokenizer_for(config))
    model_config = spec.model_config(config, vocab_size=tokenizer.vocab_size)
    adapter = spec.state_dict_adapter(model_config)
    with torch.device("meta"):
        model = spec.build_model(model_config)
    if to_hf and config.lora.rank > 0:  # a LoRA run's checkpoint: merged into the export
        roles = spec.decoder_roles(model_config) if spec.decoder_roles else None
        apply_lora(model, roles, config.lora, model_name=spec.name)
    materialize_for_loading([model], torch.device("cpu"))  # the load fills every weight
    begin = time.perf_counter()
    if to_hf:
        if problem := checkpoint_problem(src, need_marker=False, verify=True):
            raise CheckpointError(f"{src}: {problem}")
        metadata = read_metadata(src)
        if (held := model_keys(metadata)) and all(map(is_adapter, held)):
            raise CheckpointError(
                f"{src} holds LoRA adapters only (--lora.save_adapters_only), no base weights "
                "to merge them into: export with --checkpoint.last_save_in_hf during the run"
            )
        state = ModelState(model)
        model_state = state.state_dict()
        check_model_matches(model_state, metadata, src, set(model_state))
        safe_load({"model": state}, Path(src), no_dist=True)
        chat_template = chat_template_for(config.data, tokenizer)
        save_hf_weights(
            model,
            dst,
            adapter,
            dtype=getattr(torch, dtype),
            tokenizer=tokenizer,
            chat_template=chat_template,
        )
    else:
        load_hf_weights(model, src, adapter)
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that did not finish
        model_state = {"model": ModelState(model, getattr(torch, dtype))}
        dcp.save(model_state, storage_writer=ChecksumWriter(tmp), no_dist=True)
        write_complete(tmp, dst, step=0, names=["model"])
    print(f"converted {src} → {dst} in {time.perf_counter() - begin:.1f} s")


def main(args: argparse.Namespace) -> None:
    with reported():
        convert(args)
