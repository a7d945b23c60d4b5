"""Where a MoE decoder meets the mesh. This step: FSDP (with HSDP, activation checkpointing,
compile and float8 of the dense linears) over whole blocks, experts included. Expert parallel,
tensor parallel of the dense parts and pipeline stages come with ``--parallelism.ep``; until
then ``check_parallelism`` refuses them in one line."""

from __future__ import annotations

from tetrad.config import Config
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.parallelize import apply_parallelisms
from tetrad.errors import ConfigError
from tetrad.models.float8 import apply_float8
from tetrad.models.moe.layer import Router
from tetrad.models.moe.model import MoEConfig
from tetrad.models.spec import DecoderModel


def parallelize_moe(model: DecoderModel, parallel_dims: ParallelDims, config: Config) -> None:
    """Float8 for the attention and dense MLP linears (not the routers: a token's choice of
    experts should not flip with a float8 rounding; the stacked experts are no ``nn.Linear``),
    then the configured parallelisms, block by block."""
    routers = {f"{fqn}.gate" for fqn, m in model.named_modules() if isinstance(m, Router)}
    apply_float8(model, config.float8, skip_fqns={"output", *routers})
    apply_parallelisms(model, model.blocks(), parallel_dims, config, tp_roles=None)


def check_parallelism(model_config: MoEConfig, config: Config) -> None:
    p = config.parallelism
    if p.tp > 1:
        raise ConfigError(
            f"--parallelism.tp {p.tp}: MoE models train with data and pipeline parallel (FSDP, "
            "HSDP, DDP, PP) for now; use --parallelism.tp 1"
        )
    if p.cp > 1 and model_config.aux_loss_coef > 0:
        raise ConfigError(
            f"--parallelism.cp {p.cp}: the sequence-wise balance loss needs whole sequences on "
            "a rank; use --parallelism.cp 1 or a preset without it (aux_loss_coef 0)"
        )
