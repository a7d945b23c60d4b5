"""Where a MoE decoder meets the mesh: Llama 3's roles for attention and the dense
feed-forwards (tensor parallel splits those; MoE layers stay whole under it and split their
experts over expert parallel), and what MoE configs allow under each layout."""

from __future__ import annotations

import dataclasses

from tetrad.config import Config
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.errors import ConfigError
from tetrad.models.llama3.parallelize import LLAMA3_ROLES
from tetrad.models.moe.model import MoEConfig, MoETransformer
from tetrad.models.parallelize import check_heads_split, parallelize_decoder
from tetrad.models.spec import DecoderModel

# Qwen3's per-head q/k norms: under tensor parallel their gradients sum over the tp ranks.
_QK_NORM_ROLES = dataclasses.replace(LLAMA3_ROLES, head_norms=("q_norm", "k_norm"))


def parallelize_moe(model: DecoderModel, parallel_dims: ParallelDims, config: Config) -> None:
    assert isinstance(model, MoETransformer)
    roles = _QK_NORM_ROLES if model.config.qk_norm else LLAMA3_ROLES
    parallelize_decoder(model, parallel_dims, config, roles=roles, output_fqn="output")


def check_parallelism(model_config: MoEConfig, config: Config) -> None:
    p = config.parallelism
    check_heads_split(config.model.flavor, model_config.n_heads, model_config.kv_heads, p.tp)
    if p.cp > 1 and model_config.aux_loss_coef > 0:
        raise ConfigError(
            f"--parallelism.cp {p.cp}: the sequence-wise balance loss needs whole sequences on "
            "a rank; use --parallelism.cp 1 or a preset without it (aux_loss_coef 0)"
        )
