"""Llama 3's names for the decoder roles and what its configs allow under each layout."""

from __future__ import annotations

import functools

from tetrad.config import Config
from tetrad.distributed.tensor_parallel import DecoderRoles
from tetrad.models.llama3.model import Llama3Config
from tetrad.models.parallelize import check_heads_split, parallelize_decoder

LLAMA3_ROLES = DecoderRoles(
    embedding="tok_embeddings",
    final_norm="norm",
    output="output",
    attention="attention",
    q="wq",
    k="wk",
    v="wv",
    o="wo",
    mlp="feed_forward",
    gate="w1",
    up="w3",
    down="w2",
    attention_norm="attention_norm",
    mlp_norm="ffn_norm",
)

parallelize_llama3 = functools.partial(parallelize_decoder, roles=LLAMA3_ROLES, output_fqn="output")


def check_parallelism(model_config: Llama3Config, config: Config) -> None:
    check_heads_split(
        config.model.flavor, model_config.n_heads, model_config.kv_heads, config.parallelism.tp
    )
