"""The GPU check scripts' --dry-run (CPU, gloo, tiny preset, fp32), so that they cannot rot: every
check is listed, the CUDA-only ones and the 4-GPU layout are skipped, the rest pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# script, report, each check's status in a dry run (in the order the script runs them)
SUITES = {
    "gpu_check": (
        [sys.executable, "scripts/gpu_check.py"],
        {
            "debug_bf16_learns": "PASS",
            "1b_compile_sac": "SKIP",
            "1b_float8_tensorwise": "SKIP",
            "1b_float8_rowwise": "SKIP",
            "1b_bf16_optimizer_states": "PASS",
            "resume_exact": "PASS",
            "hf_tiny_learns": "PASS",
            "sft_flex_learns": "PASS",
            "profile_cuda": "SKIP",
            "estimate_matches_peak": "SKIP",
            "oom_snapshot": "SKIP",
        },
    ),
    "multi_gpu_check": (
        ["scripts/multi_gpu_check.sh"],
        {
            "fsdp2": "PASS",
            "tp2": "PASS",
            "pp2": "PASS",
            "cp2": "PASS",
            "fsdp2_tp2": "SKIP",
            "ep2": "PASS",
            "ep2_tp2": "SKIP",
        },
    ),
}


@pytest.mark.parametrize("suite", list(SUITES))
def test_dry_run_passes_or_skips_every_check(suite: str, tmp_path) -> None:
    command, expected = SUITES[suite]
    result = subprocess.run(
        [*command, str(tmp_path), "--dry-run"],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / f"{suite}.json").read_text())
    assert report["dry_run"] and report["torch"] and report["date"] and report["device"]
    checks = report["checks"]
    assert [(c["name"], c["status"]) for c in checks] == list(expected.items())
    for check in checks:
        assert f"{check['status']:4}  {check['name']}" in result.stdout
        if check["status"] == "SKIP":
            assert check["reason"].startswith(("CUDA only: ", "needs 4 GPUs"))
        else:
            assert len(check["loss"]) == 3 and check["commands"] and check["wall_s"] > 0
            assert check["memory_gib"] > 0 and check["tokens_per_sec"] > 0
