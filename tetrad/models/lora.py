"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen linear
W plus a trainable low-rank update, y = W·x + alpha/r · B·A·x, with A [r, in] and B [out, r].

The adapted linear is an ``nn.Linear`` that keeps its ``weight`` (and ``bias``), so checkpoint
and Hugging Face keys of the base are unchanged; the adapters are its ``lora_a`` and ``lora_b``.
B starts at zero, so the adapted model starts equal to the base. Applied on the meta model before
parallelisms; everything else in the model is frozen, so the optimizer, gradient reductions and
(optionally) checkpoints hold the adapters only. Model code stays plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor

from tetrad.config.job_config import LoRAConfig
from tetrad.distributed.tensor_parallel import DecoderRoles
from tetrad.errors import ConfigError
from tetrad.models.spec import DecoderModel

ADAPTER_NAMES = ("lora_a", "lora_b")
_ATTENTION_TARGETS = ("q", "k", "v", "o")


def is_adapter(fqn: str) -> bool:
    """Whether a parameter FQN names an adapter (``...wq.lora_a``), not a base weight."""
    return fqn.rpartition(".")[2] in ADAPTER_NAMES


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update (adapters initialised by ``init_adapters_``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        rank: int,
        alpha: float,
        dropout: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig) -> LoRALinear:
        """An adapted linear sharing ``linear``'s weight and bias (the same Parameters)."""
        weight = linear.weight
        adapted = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            device=weight.device,
            dtype=weight.dtype,
        )
        adapted.weight, adapted.bias = weight, linear.bias
        return adapted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)  # [..., out]
        return super().forward(x) + update * self.scale


@torch.no_grad()
def init_adapters_(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Full-size adapters from the global RNG: A as nn.Linear's default (Kaiming-uniform, as
    the paper's reference code and PEFT), B zero so that training starts from the base."""
    nn.init.kaiming_uniform_(lora_a, a=5**0.5)
    nn.init.zeros_(lora_b)


def apply_lora(
    model: DecoderModel, roles: DecoderRoles | None, config: LoRAConfig, *, model_name: str
) -> None:
    """Adapt the ``config.targets`` projections of every block of ``model`` (on meta) in place
    and freeze every other parameter. ``roles``: the family's module names (None: a model
    whose projections tetrad does not know)."""
    if roles is None:
        raise ConfigError(
            f"--lora.rank > 0: tetrad does not know the projections of {model_name}; LoRA "
            "needs llama3 or a Llama-like Hugging Face family (Llama, Mistral, Qwen2, Qwen3)"
        )
    for block in model.blocks().children():
        for target in config.targets:
            parent = block.get_submodule(
                roles.attention if target in _ATTENTION_TARGETS else roles.mlp
            )
            name = getattr(roles, target)
            linear = parent.get_submodule(name)
            if type(linear) is not nn.Linear:
                raise ConfigError(
                    f"--lora.targets {target}: {name} is a {type(linear).__name__}, "
                    "LoRA adapts nn.Linear projections only"
                )
            parent.register_module(name, LoRALinear.from_linear(linear, config))
    for fqn, param in model.named_parameters():
        param.requires_grad_(is_adapter(fqn))


def lora_flops_per_token(model: nn.Module, dense_flops_per_token: int) -> int:
    """Training FLOPs per token of an adapted ``model`` whose full training costs
    ``dense_flops_per_token`` (6 per matmul parameter): a frozen linear weight skips its
    weight-gradient matmul (2 of its 6), and the adapters train in full. An output projection
    tied to the embedding is not among the 6·N (``DenseDecoderShape``), so not subtracted."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    frozen = sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, nn.Linear)
        and not module.weight.requires_grad
        and id(module.weight) not in embeddings
    )
    adapters = sum(p.numel() for fqn, p in model.named_parameters() if is_adapter(fqn))
    return dense_flops_per_token - 2 * frozen + 6 * adapters


def adapted_linears(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted linears by their checkpoint FQN (activation checkpointing's wrapper names
    left out, as DCP's state dicts leave them out)."""
    return {
        fqn.replace(_CHECKPOINT_PREFIX, ""): module
        for fqn, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def merged_weight(
    linears: dict[str, LoRALinear], fqn: str, weight: torch.Tensor, *, in_place: bool
) -> torch.Tensor:
    """``weight`` (the full, unsharded value of the parameter at ``fqn``) plus ``alpha/r · B·A``
    if it is an adapted linear's weight: the weight a Hugging Face export holds. ``in_place``:
    ``weight`` is a copy (a gathered DTensor) that may take the sum, so no second full tensor
    is held. A collective when the adapters are sharded: every rank holding them calls it."""
    module_fqn, _, name = fqn.rpartition(".")
    if name != "weight" or (module := linears.get(module_fqn)) is None:
        return weight
    a, b = _full(module.lora_a), _full(module.lora_b)  # [r, in], [out, r]
    out = weight if in_place else weight.clone()
    return out.addmm_(b.to(out.dtype), a.to(out.dtype), alpha=module.scale)
