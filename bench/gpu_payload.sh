#!/usr/bin/env bash
# Pack what a lent GPU machine lacks into three loads that each fit one device call (64 MiB with the working tree):
#   .whl/      wheels the machine's image lacks or has at other versions (bitsandbytes trimmed to its CUDA 13
#              library, transformers and peft at this venv's versions, gguf, prompt_toolkit, discord.py, ...);
#   .gpu/a, .gpu/b, .gpu/c
#              the embedded default's halves split in pieces: the SmolLM2 GGUF (94 MiB) and DINOv2's first 8 layers
#              as fp16 (30 MiB; the default composes only those, and the builder reads them back as fp32), plus
#              the distilled text set for training (TEXT_SET, made with `iris data distill` if absent).
# Call 1 carries .whl and .gpu/a, call 2 .gpu/b, call 3 .gpu/c; each starts with `. bench/gpu_unpack.sh`, which
# installs and reassembles once every piece is there (the machine keeps files between calls while it is warm, 30 s:
# have the next call ready). The calls (the first lease ran 1, 2 and 3 without the probe, which came after it: README,
# "GPU"):
#   1. `. bench/gpu_unpack.sh; python3 bench/gpu_report.py`                       (92 s with the machine's start)
#   2. `. bench/gpu_unpack.sh`                                                       (seconds)
#   3. `. bench/gpu_unpack.sh; python3 bench/gpu_probe.py; SKIP_REPORT=1 bash bench/gpu.sh;`
#      `bash bench/gpu_default.sh all /tmp/w`  (TEXT_SET=$SITE/pieces/text; put each output under $OUT as it ends)
# Usage: bash bench/gpu_payload.sh    (after `make setup`; needs the converted tower in the cache: run `iris ask` once)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TEXT_SET=${TEXT_SET:-/tmp/iris-text-distilled}
FIRST_PIECE=${FIRST_PIECE:-41000000}  # bytes of the GGUF in call 1, beside the wheels
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; printf '/.whl/\n/.gpu/\n' >> .git/info/exclude; }
rm -rf .whl .gpu && mkdir -p .whl .gpu/a .gpu/b .gpu/c/tower

download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$@"
}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in transformers peft gguf prompt_toolkit discord.py platformdirs bitsandbytes; do
    download "$name==$(version "$name")"
done
download wcwidth
# bitsandbytes ships a library per CUDA and ROCm version (43 MB); the machine's PyTorch is built for CUDA 13.0.
trim=$(mktemp -d)
unzip -q .whl/bitsandbytes-*.whl -d "$trim"
find "$trim/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
sed -i -E '/libbitsandbytes_(cuda11|cuda12|cuda13[1-9]|rocm)/d' "$trim"/bitsandbytes-*.dist-info/RECORD
wheel=$(basename .whl/bitsandbytes-*.whl) && rm .whl/"$wheel" && (cd "$trim" && zip -q -r "$OLDPWD/.whl/$wheel" .)
rm -rf "$trim"

gguf=$("$PY" -c "from assistant.builders.default_model import embedded_gguf_path; print(embedded_gguf_path())")
head -c "$FIRST_PIECE" "$gguf" > .gpu/a/gguf.0
tail -c +"$((FIRST_PIECE + 1))" "$gguf" > .gpu/b/gguf.1
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/c/gguf.sha256
"$PY" - <<'EOF'
"""DINOv2's first 8 layers (all the default composes) as fp16 safetensors, beside the converted tower's files."""
import re
import shutil

from safetensors.torch import load_file, save_file

from assistant.builders.default_model import DEFAULT_VISION_LAYERS
from assistant.builders.vision_tower import default_vision_tower_dir

tower = default_vision_tower_dir()
kept = {}
for name, tensor in load_file(tower / "model.safetensors").items():
    layer = re.search(r"encoder\.layer\.(\d+)\.", name)
    if layer is None or int(layer.group(1)) < DEFAULT_VISION_LAYERS:
        kept[name] = tensor.half() if tensor.is_floating_point() else tensor
save_file(kept, ".gpu/c/tower/model.safetensors")
for name in ("config.json", "preprocessor_config.json", "conversion.json"):
    shutil.copy(tower / name, ".gpu/c/tower")
EOF
[ -d "$TEXT_SET" ] || .venv/bin/iris data distill --out "$TEXT_SET" --n 150 --seed 103 --max-new-tokens 80
cp -r "$TEXT_SET" .gpu/c/text
tracked=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
for load in ".whl .gpu/a" ".gpu/b" ".gpu/c"; do
    # shellcheck disable=SC2086
    echo "call carrying $load: $(( ($(du -cb $load | tail -1 | cut -f1) + tracked) / 1048576 )) MiB with the tree (limit 64)"
done
