#!/usr/bin/env bash
# One prepared run for a machine with an NVIDIA GPU (< 8 minutes): 7B-shaped 4-bit vs bf16 tokens/s and
# peak memory, then the turns and overhead benchmarks on the default model. On a CPU-only machine the GPU
# rows are skipped and the rest still runs. Usage: bash bench/gpu.sh   (after `make setup`)
set -uo pipefail  # each benchmark reports on its own: one failing does not hide the others
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
if [ -z "${SKIP_REPORT:-}" ]; then  # SKIP_REPORT=1: it ran in an earlier call (bench/gpu_payload.sh)
    echo "== 7B-shaped model: 4-bit vs bf16"
    timeout 300 "$PY" bench/gpu_report.py
fi
echo "== turns (TTFT with and without caches)"
timeout 240 "$PY" bench/turns.py  # the first start builds the default model
echo "== overhead (DialogueManager vs bare generate)"
timeout 90 "$PY" bench/overhead.py
