#!/bin/bash
# Parallel layouts on a machine with ≥ 2 GPUs against one GPU (FSDP 2, TP 2, PP 2, CP 2, EP 2,
# and FSDP 2 × TP 2, EP 2 × TP 2 with 4 GPUs), loss and gradient norm per step within stated bf16 tolerances:
#   scripts/multi_gpu_check.sh OUT_DIR [--dry-run]     (PYTHON=... picks the interpreter)
# What runs and why the tolerances: scripts/multi_gpu_check.py. --dry-run compares the
# 2-process layouts on the CPU with gloo in fp32.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/multi_gpu_check.py" "$@"
