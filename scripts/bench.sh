#!/usr/bin/env bash
# Runs the benchmarks with their peers measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=env.sh
source scripts/env.sh
ensure_python_env
BACKPROP_PYTHON="$BACKPROP_VENV/bin/python" cargo bench --locked -p backpropagate --bench data_pipeline
cargo build --locked --release -p backprop-cli; "$BACKPROP_VENV/bin/python" benches/train_vs_peft.py
"$BACKPROP_VENV/bin/python" benches/gguf_vs_llama_quantize.py
