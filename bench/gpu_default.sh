#!/usr/bin/env bash
# Prepared run for a lent NVIDIA GPU (about 12 minutes after `make setup`): the default model's recipe
# (bench/train_default.sh, Iris's own commands) at 224 px with several times the CPU run's samples, then the
# shipped (CPU-trained, 112 px) default on the same held-out suite. Its weights are worth committing only if its
# eval table beats the shipped one; shipping them also means DEFAULT_IMAGE_SIZE = 224 in
# assistant/builders/default_model.py (256 image tokens: slower on a CPU). Never run here yet: no GPU was lent.
# Usage: bash bench/gpu_default.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/iris-gpu-default}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no NVIDIA GPU here"; exit 1; }
IMAGE_SIZE=224 SINGLE=4000 SHAPES=12000 TEXT=300 TEXT_WEIGHT=3 BATCH=32 PER_SKILL=40 FRESH_MINUTES="1 1 1" \
    timeout 600 bash bench/train_default.sh "$WORK" 6
echo "== the shipped default (CPU-trained) on the same held-out suite"
timeout 150 .venv/bin/iris eval "$WORK/heldout" --text | tee "$WORK/eval-shipped.txt"
