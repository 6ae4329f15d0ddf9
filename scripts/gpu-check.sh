#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build the CUDA engine, run the GPU tests (they skip
# themselves elsewhere), then train the fixture and (when installed) SmolLM2-135M on the
# GPU, printing tokens/s, peak VRAM and the batch the planner chose. Needs nvcc: on a
# machine without the CUDA toolkit, scripts/cuda-check.sh shows how PyPI provides it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=env.sh
source scripts/env.sh
export CARGO_TARGET_DIR="$HOME/.cache/backpropagate/target-cuda"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
cargo test --release -p backpropagate --features cuda --test gpu_path -- --nocapture
cargo build --release -p backprop-cli --features cuda
bin="$CARGO_TARGET_DIR/release/backprop"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" fixture "$work/small" --family qwen2 --size small
models=("$work/small")
if [ -f "$BACKPROP_REAL_MODEL/model.safetensors" ]; then
    models+=("$BACKPROP_REAL_MODEL")
fi
for model in "${models[@]}"; do
    for quant in f32 q4_k; do
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$work/vram.txt" &
        smi=$!
        "$bin" train --model "$model" --data assets/samples/alpaca.jsonl --steps 30 \
            --max-seq-len 512 --device cuda --base-quant "$quant" --runs-dir "$work/runs" --json \
            > "$work/events.jsonl"
        kill "$smi"
        peak=$(sort -n "$work/vram.txt" | tail -1)
        batch=$(grep -o 'micro-batch [0-9]* × accumulation [0-9]*' "$work/events.jsonl" | head -1)
        tps=$(grep '"type":"Step"' "$work/events.jsonl" | tail -10 |
            grep -o '"tokens_per_s":[0-9.]*' | cut -d: -f2 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
        echo "gpu-check: $(basename "$model") base $quant: $batch, median tokens/s $tps, peak VRAM ${peak} MiB"
    done
done
