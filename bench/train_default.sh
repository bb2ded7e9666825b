#!/usr/bin/env bash
# The recipe of the embedded default model's weights, with Iris's own commands only (no side scripts):
#   1. compose a fresh base (embedded SmolLM2-135M-Instruct + DINOv2 ViT-S/14's first VISION_LAYERS layers, class
#      token kept): the projector reads a middle layer, where DINOv2 still holds colour;
#   2. synthetic shapes in the training styles: single objects (the curriculum's first stage), then 1-4 objects;
#      text-only samples answered by the base LM itself (self-distillation keeps its text answers);
#   3. `iris train`: single objects, then 1-4 objects with --from stage 1, then one more stage per FRESH_MINUTES entry,
#      each on a fresh 1-4 object set (FRESH_SAMPLES, seeds 105, 106, ...) with --from the stage before (each
#      raised the held-out total by 1-3 points, README). STAGE=projector (the default)
#      trains the projector alone: the LM stays the base's, so its text answers are kept exactly, and on a CPU
#      budget it learned more than projector-then-LoRA (bench/own_task.py). STAGE=auto adds LoRA, with the
#      base LM's own text answers mixed in (self-distillation) so that it keeps them;
#   4. with YES_NO_MINUTES > 0, one LoRA stage (r8, + projector) on a fresh set whose yes/no answers name what is
#      seen, then the verdict, with text-only yes/no samples (`iris data synth --compare`) and the distilled text;
#   5. `iris eval` on the held-out style (per skill, blank-image ablation, POPE yes/no) plus the text row.
# The weights to ship are the last stage's (WORK/stage5 with the defaults): projector.safetensors (+ the PEFT files
# with LoRA) and iris_manifest.json.
#
# Usage: bash bench/train_default.sh WORK [MINUTES]     (CPU: about MINUTES + the FRESH_MINUTES + 15 minutes in all)
# Knobs (environment): IMAGE_SIZE (112; the GPU script uses 224), VISION_LAYERS (8 of 12), FRESH_MINUTES ("30 45 35")
# and FRESH_SAMPLES ("4000 7000 6000"), SINGLE and SHAPES (sample counts), TEXT (distilled
# text samples) and TEXT_WEIGHT (times each is mixed in), BATCH, LORA_R, YES_NO_MINUTES (0), PER_SKILL (eval questions
# per skill), IRIS (the iris command).
set -euo pipefail
WORK=${1:?usage: bash bench/train_default.sh WORK [MINUTES]}
MINUTES=${2:-60}
IMAGE_SIZE=${IMAGE_SIZE:-112}
VISION_LAYERS=${VISION_LAYERS:-8}
read -r -a fresh_minutes <<< "${FRESH_MINUTES:-30 45 35}"
read -r -a fresh_samples <<< "${FRESH_SAMPLES:-4000 7000 6000}"
SINGLE=${SINGLE:-3000}
SHAPES=${SHAPES:-4000}
TEXT=${TEXT:-150}
TEXT_WEIGHT=${TEXT_WEIGHT:-3}
BATCH=${BATCH:-8}
LORA_R=${LORA_R:-8}
STAGE=${STAGE:-projector}
PER_SKILL=${PER_SKILL:-40}
YES_NO_MINUTES=${YES_NO_MINUTES:-0}
IRIS=${IRIS:-.venv/bin/iris}
export HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
mkdir -p "$WORK"
stage1_minutes=$(python3 -c "print(round($MINUTES * 0.25, 1))")
stage2_minutes=$(python3 -c "print(round($MINUTES * 0.75, 1))")

step() { echo "== $(date +%H:%M:%S) $*"; }

[ -d "$WORK/base" ] || { step "compose the base at ${IMAGE_SIZE} px"; $IRIS build --out "$WORK/base" --image-size "$IMAGE_SIZE" --class-token --vision-layers "$VISION_LAYERS"; }
[ -d "$WORK/single" ] || { step "single-object shapes"; $IRIS data synth --out "$WORK/single" --n "$SINGLE" --max-objects 1 --seed 101; }
[ -d "$WORK/shapes" ] || { step "1-4 object shapes"; $IRIS data synth --out "$WORK/shapes" --n "$SHAPES" --seed 102; }
[ -d "$WORK/heldout" ] || { step "held-out eval suite"; $IRIS data synth --eval-suite --out "$WORK/heldout" --per-skill "$PER_SKILL" --seed 104; }

common=(-m "$WORK/base" --stage "$STAGE" --batch-size "$BATCH" --lora-r "$LORA_R" --lora-alpha $((LORA_R * 2)))
step "stage 1: single objects, ${stage1_minutes} min"
$IRIS train "$WORK/single" "${common[@]}" --out "$WORK/stage1" --max-minutes "$stage1_minutes"
mix=()
if [ "$STAGE" != projector ]; then
    [ -d "$WORK/text" ] || { step "text answered by the base LM"; $IRIS data distill --out "$WORK/text" --n "$TEXT" --seed 103 --max-new-tokens 80; }
    for _ in $(seq "$TEXT_WEIGHT"); do mix+=(--mix "$WORK/text"); done  # each text sample seen TEXT_WEIGHT times
fi
step "stage 2: 1-4 objects (+ text with LoRA), from stage 1, ${stage2_minutes} min"
$IRIS train "$WORK/shapes" "${mix[@]}" "${common[@]}" --from "$WORK/stage1" --out "$WORK/stage2" \
    --max-minutes "$stage2_minutes"
stage=2
for index in "${!fresh_minutes[@]}"; do
    stage=$((stage + 1))
    shapes="$WORK/shapes$stage"
    [ -d "$shapes" ] || { step "a fresh 1-4 object set"; $IRIS data synth --out "$shapes" --n "${fresh_samples[$index]}" --seed $((102 + stage)); }
    step "stage $stage: the fresh set, from stage $((stage - 1)), ${fresh_minutes[$index]} min"
    $IRIS train "$shapes" "${mix[@]}" "${common[@]}" --from "$WORK/stage$((stage - 1))" --out "$WORK/stage$stage" \
        --max-minutes "${fresh_minutes[$index]}"
done
if [ "$YES_NO_MINUTES" != 0 ]; then  # LoRA + projector on yes/no answers that name what is seen, then compare
    stage=$((stage + 1))
    [ -d "$WORK/text" ] || { step "text answered by the base LM"; $IRIS data distill --out "$WORK/text" --n "$TEXT" --seed 103 --max-new-tokens 80; }
    [ -d "$WORK/shapes$stage" ] || { step "a fresh 1-4 object set"; $IRIS data synth --out "$WORK/shapes$stage" --n 6000 --seed 111; }
    [ -d "$WORK/compare" ] || { step "text-only yes/no samples"; $IRIS data synth --compare --out "$WORK/compare" --n 3000 --seed 112; }
    step "stage $stage: LoRA r8 + projector, from stage $((stage - 1)), ${YES_NO_MINUTES} min"
    $IRIS train "$WORK/shapes$stage" --mix "$WORK/compare" --mix "$WORK/text" --mix "$WORK/text" --mix "$WORK/text" \
        -m "$WORK/base" --stage lora --batch-size "$BATCH" --lora-r 8 --lora-alpha 16 --lr-lora 5e-4 --lr-projector 5e-4 \
        --from "$WORK/stage$((stage - 1))" --out "$WORK/stage$stage" --max-minutes "$YES_NO_MINUTES"
fi
step "eval on the held-out style"
$IRIS eval "$WORK/heldout" -m "$WORK/base" --adapter "$WORK/stage$stage" --text | tee "$WORK/eval.txt"
