"""Async tensor parallel's wiring: it runs on CPU, though the overlap it turns on needs CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch.distributed as dist
from torch._inductor import config as inductor_config
from torch.distributed._symmetric_memory import is_symm_mem_enabled_for_group
from torch.distributed.device_mesh import init_device_mesh

from tetrad.distributed.parallelize import _enable_async_tp


def test_async_tp_turns_on_the_inductor_pass_and_symmetric_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inductor_config, "_micro_pipeline_tp", False)  # restored afterwards
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tp_mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's deprecation warning stays inside
            _enable_async_tp(tp_mesh)
        assert inductor_config._micro_pipeline_tp
        # What the pass checks before it fuses a collective with a matmul.
        assert is_symm_mem_enabled_for_group(tp_mesh.get_group().group_name)
    finally:
        dist.destroy_process_group()
