#!/usr/bin/env bash
# GPU check of the training core alone (no Ray, no network): d12 and d20 runs on random tokens,
# bf16 + torch.compile, tokens/s and MFU vs 989 TFLOP/s, plus a KV-cache check on the GPU.
# Results (gpu_check.json, gpu_check.txt, gpu_check.log) go to $OUT (default ./gpu_out).
#
# Run from anywhere:  bash benchmarks/gpu_check.sh            (extra args go to gpu_check.py)
#                     bash benchmarks/gpu_check.sh --smoke    (CPU, depth 2, seconds)
# Uses $PYTHON if set, else python3 (the one that has torch). Stops itself after 290 s.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$repo/gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
fi
timeout 290 "${PYTHON:-python3}" "$repo/benchmarks/gpu_check.py" --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
