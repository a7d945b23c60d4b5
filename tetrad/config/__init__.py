"""Typed job configuration: dataclasses per section, loaded from TOML and the command line."""

from tetrad.config.job_config import Config
from tetrad.config.loader import (
    changed_options,
    config_from_args,
    config_to_dict,
    load_config,
    save_config,
    saved_run_config,
    validate_config,
    validate_device,
)
from tetrad.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "changed_options",
    "config_from_args",
    "config_to_dict",
    "load_config",
    "save_config",
    "saved_run_config",
    "validate_config",
    "validate_device",
]
