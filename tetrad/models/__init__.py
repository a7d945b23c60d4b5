"""Model families and the registry that finds them by name."""

from tetrad.models.registry import get_model_spec
from tetrad.models.spec import ModelSpec

__all__ = ["ModelSpec", "get_model_spec"]
