"""torch.compile per transformer block: repeated blocks share one compiled graph, so compile
time does not grow with depth."""

from __future__ import annotations

import os

from torch import nn

from tetrad.config.job_config import CompileConfig


def apply_compile(
    model: nn.Module, blocks: nn.Module, config: CompileConfig, *, whole_model: bool
) -> None:
    """Compile in place (FQNs unchanged); ``blocks`` is a ModuleDict or ModuleList of blocks.
    ``whole_model`` is for tensor parallel, whose DTensor
    backward breaks across per-block graph boundaries in torch 2.13."""
    if not config.enable:
        return
    if config.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = config.cache_dir
    if whole_model:
        model.compile()
        return
    for block in blocks.children():
        block.compile()
