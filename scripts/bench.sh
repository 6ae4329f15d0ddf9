#!/usr/bin/env bash
# The benchmark harness: every benchmark against its peer, measured in the same run
# (medians of repeated runs), then one report with the ratios at
# $CARGO_TARGET_DIR/bench/report.md and the loss curves (ours vs PEFT) as PNG.
# `--quick` runs fewer steps and repeats, to check the harness itself.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=env.sh
source scripts/env.sh
ensure_python_env
py="$BACKPROP_VENV/bin/python"
out="$CARGO_TARGET_DIR/bench"
mkdir -p "$out"
steps=30 repeats=3
if [ "${1:-}" = "--quick" ]; then steps=6 repeats=1; fi

cargo build --locked --release -p backprop-cli
export BACKPROP_BIN="$CARGO_TARGET_DIR/release/backprop"
BACKPROP_PYTHON="$py" cargo bench --locked -p backpropagate --bench data_pipeline
"$py" benches/train_vs_peft.py --steps "$steps" --repeats "$repeats" \
    --out "$out/train_vs_peft.md" --plot "$out/loss_curves.png"
if [ -f "$BACKPROP_REAL_MODEL/model.safetensors" ]; then
    "$py" benches/train_vs_peft.py --steps "$steps" --repeats "$repeats" --real-model "$BACKPROP_REAL_MODEL" \
        --out "$out/train_vs_peft_real.md" --plot "$out/loss_curves_real.png"
    # bf16 products on CPUs with AVX512-BF16 (`backprop doctor` says), against the
    # peer in f32 and under bf16 autocast.
    if grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then
        "$py" benches/train_vs_peft.py --steps "$steps" --repeats "$repeats" --real-model "$BACKPROP_REAL_MODEL" \
            --precision bf16 --peer-precision f32 --out "$out/train_vs_peft_real_bf16.md"
        "$py" benches/train_vs_peft.py --steps "$steps" --repeats "$repeats" --real-model "$BACKPROP_REAL_MODEL" \
            --precision bf16 --out "$out/train_vs_peft_real_bf16_autocast.md"
    fi
fi
"$py" benches/gguf_vs_llama_quantize.py
"$py" benches/report.py "$out"
