"""Meta-built (possibly parallelized) model parts → real tensors on the rank's device, with
weights that do not depend on the parallel layout, in memory bounded by the rank's shards.

Each module's own parameters are drawn in full on the device, from a seed derived from the run's
seed and the module's name alone, on a stand-in of the module taken from a meta-built reference
model; every rank keeps its slice and frees the stand-in. So one process, FSDP, TP or a pipeline
stage that holds a few blocks all draw bit-identical values, a stage that skips modules does not
shift the others' random streams, and no rank ever holds more than its shards plus one module's
full parameters (a 405B run starts on hosts that could not hold the model).

The model contract (see ``ModelSpec.build_model``): ``init_module_parameters(fqn, module)``
initialises the module's own parameters, full-size, from the global RNG, and
``init_buffers(device)`` recomputes the buffers no checkpoint holds (rotary tables) and re-ties
shared parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tetrad.distributed.utils import copy_full_
from tetrad.models.lora import adapted_linears, init_adapters_, is_adapter
from tetrad.models.spec import DecoderModel


def module_seed(seed: int, fqn: str) -> int:
    """The seed of module ``fqn``'s parameters: a hash, identical in every process (Python's
    ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{fqn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes < 2**63


def _parameter_owners(root: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """(module FQN, module, names of the parameters it owns): a parameter shared by several
    modules (tied embeddings) belongs to the first that holds it."""
    seen: set[int] = set()
    for fqn, module in root.named_modules():
        own = [n for n, p in module._parameters.items() if p is not None and id(p) not in seen]
        seen.update(id(module._parameters[n]) for n in own)
        if own:
            yield fqn, module, own


@torch.no_grad()
def init_weights(model: DecoderModel, *, seed: int) -> None:
    """Initialise a plain (unsharded, materialised) model in place, to the values
    ``materialize_and_init`` gives any layout of it with the same seed."""
    device = next(model.parameters()).device
    with _forked_rng(device):
        for fqn, module, _ in _parameter_owners(model):
            torch.manual_seed(module_seed(seed, fqn))
            model.init_module_parameters(fqn, module)


@torch.no_grad()
def materialize_and_init(
    parts: Sequence[DecoderModel], reference: DecoderModel, *, device: torch.device, seed: int
) -> None:
    """Allocate ``parts`` (the whole model, or this rank's pipeline stages, each the full model
    minus what it does not hold, so FQNs are the full model's) on ``device`` and initialise them
    from ``reference``, the same model built on meta without parallelism (and without LoRA: the
    adapters are ``init_adapters``' to initialise, in every start path).

    Extra memory: one module's own parameters in full (the largest is the embedding or an FFN
    projection), on the device.
    """
    targets: dict[str, torch.Tensor] = {}
    for part in parts:
        part.to_empty(device=device)
        part.init_buffers(device)
        targets.update(part.state_dict())  # clean FQNs; DTensors share the parts' storage
    names: defaultdict[int, list[str]] = defaultdict(
        list
    )  # every FQN of each reference parameter (tied ones have two)
    for fqn, param in reference.named_parameters(remove_duplicate=False):
        names[id(param)].append(fqn)
    filled: set[str] = set()
    with _forked_rng(device):
        for fqn, module, own in _parameter_owners(reference):
            wanted = {n: [f for f in names[id(module._parameters[n])] if f in targets] for n in own}
            if not any(wanted.values()):
                continue  # another pipeline stage's module
            meta: dict[str, nn.Parameter | None] = {n: module._parameters[n] for n in own}
            try:
                for n, meta_param in meta.items():
                    assert meta_param is not None  # ``own`` names set parameters only
                    stand_in = torch.empty(meta_param.shape, dtype=meta_param.dtype, device=device)
                    module._parameters[n] = nn.Parameter(stand_in, meta_param.requires_grad)
                torch.manual_seed(module_seed(seed, fqn))
                reference.init_module_parameters(fqn, module)
                for n, fqns in wanted.items():
                    for target_fqn in fqns:
                        copy_full_(targets[target_fqn], module.get_parameter(n))
                        filled.add(target_fqn)
            finally:
                module._parameters.update(meta)  # frees the stand-ins, keeps the reference tied
    # Persistent buffers (an MoE's routing biases) are init_buffers' to fill.
    buffers = {fqn for fqn, _ in reference.named_buffers()}
    if missing := sorted(k for k in set(targets) - filled - buffers if not is_adapter(k)):
        raise RuntimeError(f"no initialiser reached {missing[0]} ({len(missing)} tensors)")


@torch.no_grad()
def init_adapters(parts: Sequence[DecoderModel], *, device: torch.device, seed: int) -> None:
    """Initialise the LoRA adapters of materialised ``parts`` (plain or sharded), whatever
    filled their base weights: each linear's drawn in full on ``device`` from a seed of its
    FQN, so every layout gets the same values, holding one linear's adapters at a time."""
    with _forked_rng(device):
        for part in parts:
            for fqn, module in adapted_linears(part).items():
                params = (module.lora_a, module.lora_b)
                a, b = (torch.empty(p.shape, dtype=p.dtype, device=device) for p in params)
                torch.manual_seed(module_seed(seed, f"{fqn}.lora"))
                init_adapters_(a, b)
                copy_full_(module.lora_a, a)
                copy_full_(module.lora_b, b)


def _forked_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Leave the global generators as they were: initialisation reseeds them per module."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def materialize_for_loading(parts: Sequence[DecoderModel], device: torch.device) -> None:
    """Allocate meta-built model parts for weights that a checkpoint will fill: no
    initialisation, only the buffers no checkpoint holds (rotary tables) and re-tied
    embeddings, which ``to_empty`` unties."""
    for part in parts:
        part.to_empty(device=device)
        part.init_buffers(device)
