"""``tetrad generate``: sample text from a trained model, on one process or tensor parallel
across several (``tetrad generate --nproc 2 --parallelism.tp 2``; each rank runs
``python -m tetrad.generate``).

The model is the run's: a DCP checkpoint (``--checkpoint .../step-N``) is read with the
``config.toml`` of the run it belongs to (``--config`` and ``--model.*`` override it), built as
the trainer builds it (on meta, parallelized by the family's plan, then filled from the
checkpoint); ``--model.name hf --model.hf_path DIR`` runs a Hugging Face model from its own
weights. Decoding goes through the model's own attention with a ``KVCache``
(``tetrad.components.generation``). Rank 0 prints the completion on stdout and its speed on
stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from tetrad.cli import add_generate_arguments
from tetrad.components.checkpoint_folder import check_model_matches, read_metadata
from tetrad.components.checkpoint_states import ModelState
from tetrad.components.checkpoint_storage import safe_load
from tetrad.components.generation import Generation, Sampler, generate
from tetrad.components.hf_checkpoint import load_hf_weights
from tetrad.config import Config, config_from_args, saved_run_config, validate_config
from tetrad.config.args import ArgumentParser
from tetrad.data import Tokenizer, build_tokenizer
from tetrad.errors import CheckpointError, ConfigError, reported
from tetrad.models.lora import apply_lora
from tetrad.models.materialize import materialize_for_loading
from tetrad.models.registry import get_model_spec
from tetrad.models.spec import DecoderModel


def _prompt(args: argparse.Namespace) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise ConfigError("give the text to continue with either --prompt or --prompt-file")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file {path}: no such file")
        text = path.read_text()
    else:
        text = args.prompt
    if not text.strip():
        raise ConfigError("the prompt is empty; give some text to continue")
    return str(text)


def resolve(args: argparse.Namespace) -> tuple[Config, str]:
    """The run's config (from the checkpoint's run folder unless --config is given) as
    generation uses it, and the prompt; every check that needs no process group."""
    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0:
        raise ConfigError("--max-new-tokens must be >= 1, --temperature and --top-k >= 0")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    prompt = _prompt(args)
    if args.checkpoint is not None:
        checkpoint = Path(args.checkpoint)
        if not (checkpoint / ".metadata").is_file():
            what = (
                "is not a DCP checkpoint (no .metadata)"
                if checkpoint.exists()
                else "does not exist"
            )
            raise CheckpointError(
                f"--checkpoint {checkpoint} {what}; give a run's checkpoint/step-N folder "
                "(a Hugging Face folder: --model.name hf --model.hf_path DIR)"
            )
        config = saved_run_config(args, checkpoint.parent.parent / "config.toml")
    else:
        config = config_from_args(args)
    if args.checkpoint is None and config.model.name != "hf":
        raise ConfigError(
            "nothing to generate from: give --checkpoint DIR (a DCP step-N folder) or "
            "--model.name hf --model.hf_path DIR"
        )
    p = config.parallelism
    if p.pp > 1 or p.cp > 1:
        raise ConfigError("tetrad generate runs tensor and data parallel only: use pp 1, cp 1")
    # Inference: decoding one token at a time cannot be split along the sequence, and the
    # sampler needs the whole vocabulary's logits.
    p.enable_sequence_parallel = p.enable_loss_parallel = p.enable_async_tp = False
    config.compile.enable = False
    config.activation_checkpoint.mode = "none"
    validate_config(config)
    return config, prompt


def build_model(
    config: Config, checkpoint: Path | None, device: torch.device
) -> tuple[DecoderModel, Tokenizer, int]:
    """The model built as the trainer builds it, its weights from ``checkpoint`` (DCP) or, for a
    family with its own weights (``--model.name hf``), from those; its tokenizer and the number
    of positions it can see."""
    from tetrad.distributed.parallel_dims import ParallelDims

    spec = get_model_spec(config.model.name)
    tokenizer = build_tokenizer(spec.tokenizer_for(config))
    model_config = spec.model_config(config, vocab_size=tokenizer.vocab_size)
    if spec.check_parallelism is not None:
        spec.check_parallelism(model_config, config)
    with torch.device("meta"):
        model = spec.build_model(model_config)
    if config.lora.rank > 0:
        roles = spec.decoder_roles(model_config) if spec.decoder_roles else None
        apply_lora(model, roles, config.lora, model_name=spec.name)
    dims = ParallelDims.from_config(config.parallelism, dist.get_world_size())
    spec.parallelize_fn(model, dims, config)
    materialize_for_loading([model], device)
    if checkpoint is not None:
        state = ModelState(model)
        model_state = state.state_dict()
        check_model_matches(model_state, read_metadata(checkpoint), checkpoint, set(model_state))
        safe_load({"model": state}, checkpoint)
    else:
        weights = spec.weights_folder(model_config) if spec.weights_folder else None
        if weights is None or spec.state_dict_adapter is None:
            raise CheckpointError(f"{config.model.hf_path} holds no weights; give --checkpoint DIR")
        load_hf_weights(model, weights, spec.state_dict_adapter(model_config))
    return model, tokenizer, model_config.max_seq_len


def run(args: argparse.Namespace) -> Generation:
    """One rank's generation; rank 0 reports it."""
    from tetrad.distributed.init import init_distributed

    config, text = resolve(args)
    device = init_distributed(config.comm.init_timeout_seconds)
    try:
        checkpoint = None if args.checkpoint is None else Path(args.checkpoint)
        model, tokenizer, max_len = build_model(config, checkpoint, device)
        prompt = tokenizer.encode(text, bos=True, eos=False)
        if len(prompt) + args.max_new_tokens > max_len:
            raise ConfigError(
                f"the prompt's {len(prompt)} tokens + --max-new-tokens {args.max_new_tokens} "
                f"exceed the model's {max_len} positions"
            )
        sampler = Sampler(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            device=device,
        )
        result = generate(
            model,
            prompt,
            max_new_tokens=args.max_new_tokens,
            sampler=sampler,
            stop_ids={tokenizer.eos_id},
            device=device,
        )
        if dist.get_rank() == 0:
            _report(args, tokenizer, prompt, result, world_size=dist.get_world_size())
        return result
    finally:
        dist.destroy_process_group()


def _report(
    args: argparse.Namespace,
    tokenizer: Tokenizer,
    prompt: list[int],
    result: Generation,
    *,
    world_size: int,
) -> None:
    completion = tokenizer.decode(result.tokens)
    print(completion, flush=True)
    print(
        f"tetrad: {len(result.tokens)} tokens in "
        f"{result.prefill_seconds + result.decode_seconds:.2f} s: "
        f"{result.tokens_per_second:.1f} tokens/s (prompt of {len(prompt)} tokens, prefill "
        f"{result.prefill_seconds:.3f} s; {world_size} process(es))",
        file=sys.stderr,
    )
    if args.out is not None:
        record = {
            "prompt_ids": prompt,
            "ids": result.tokens,
            "text": completion,
            "prefill_seconds": result.prefill_seconds,
            "decode_seconds": result.decode_seconds,
            "tokens_per_second": result.tokens_per_second,
        }
        Path(args.out).write_text(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="tetrad generate")
    add_generate_arguments(parser)
    with reported():
        run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
