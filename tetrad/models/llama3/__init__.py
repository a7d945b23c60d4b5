"""The Llama 3 family: model, presets and its ModelSpec."""

from tetrad.models.llama3.model import Llama3Config, RopeScaling, Transformer, num_flops_per_token
from tetrad.models.llama3.parallelize import LLAMA3_ROLES, check_parallelism, parallelize_llama3
from tetrad.models.llama3.presets import llama3_presets
from tetrad.models.llama3.state_dict_adapter import Llama3StateDictAdapter
from tetrad.models.spec import ModelSpec

llama3_spec = ModelSpec(
    name="llama3",
    presets=llama3_presets,
    build_model=Transformer,
    num_flops_per_token=num_flops_per_token,
    parallelize_fn=parallelize_llama3,
    check_parallelism=check_parallelism,
    decoder_roles=lambda _: LLAMA3_ROLES,
    state_dict_adapter=Llama3StateDictAdapter,
)

__all__ = [
    "Llama3Config",
    "Llama3StateDictAdapter",
    "RopeScaling",
    "Transformer",
    "llama3_presets",
    "llama3_spec",
    "num_flops_per_token",
]
