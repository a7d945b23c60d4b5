"""Where a decoder meets the mesh, for every family: convert to float8 (a model conversion),
then apply the parallelisms in their fixed order with tensor parallel's plan by module role
(``tetrad.distributed.tensor_parallel``). A family contributes its role names and the checks
of what its configs allow."""

from __future__ import annotations

from collections.abc import Iterable

from tetrad.config import Config
from tetrad.distributed.parallel_dims import ParallelDims
from tetrad.distributed.parallelize import apply_parallelisms
from tetrad.distributed.tensor_parallel import DecoderRoles
from tetrad.errors import ConfigError
from tetrad.models.float8 import apply_float8
from tetrad.models.spec import DecoderModel


def parallelize_decoder(
    model: DecoderModel,
    parallel_dims: ParallelDims,
    config: Config,
    *,
    roles: DecoderRoles | None,
    output_fqn: str,
    high_precision: Iterable[str] = (),
) -> None:
    """Apply float8 and every configured parallelism to ``model`` (on meta) in place. The
    output projection (``output_fqn``) stays in high precision: its logits feed the loss; so
    do the linears named in ``high_precision`` (a mixture's routers)."""
    apply_float8(model, config.float8, skip_fqns={output_fqn, *high_precision})
    apply_parallelisms(model, model.blocks(), parallel_dims, config, tp_roles=roles)


def check_heads_split(name: str, n_heads: int, kv_heads: int, tp: int) -> None:
    """Tensor parallel gives every rank whole attention heads."""
    for what, n in (("attention heads", n_heads), ("kv heads", kv_heads)):
        if n % tp:
            raise ConfigError(f"--parallelism.tp {tp} does not divide {name}'s {n} {what}")
