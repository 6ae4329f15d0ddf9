#!/usr/bin/env bash
# The main job on a fresh machine: install prerequisites, build `backprop`, make a
# tiny model (no download needed) and run the sample data through it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=env.sh
source scripts/env.sh
cargo build --locked --release -p backprop-cli
BACKPROP="$CARGO_TARGET_DIR/release/backprop"
RUNS="$CARGO_TARGET_DIR/demo/runs"
if [ -f "$BACKPROP_REAL_MODEL/model.safetensors" ]; then
    # The real pretrained SmolLM2-135M-Instruct (bash scripts/real-model.sh installs it).
    MODEL="$BACKPROP_REAL_MODEL"
    TRAIN=(--steps 30 --batch-size 2 --max-seq-len 256)
else
    # No download needed: a tiny random-weight model with a real tokenizer and template.
    MODEL="$CARGO_TARGET_DIR/demo/tiny-qwen2"
    "$BACKPROP" fixture "$MODEL" --family qwen2
    TRAIN=(--steps 60 --lr 1e-2 --batch-size 4)
fi
"$BACKPROP" data check assets/samples/alpaca.jsonl --model "$MODEL" --show 1
echo
"$BACKPROP" train --model "$MODEL" --data assets/samples/alpaca.jsonl \
    "${TRAIN[@]}" --runs-dir "$RUNS" --name demo
RUN=$(ls -td "$RUNS"/*-demo* | head -1)
echo
echo "Exporting $RUN:"
"$BACKPROP" export "$RUN" --format gguf --quant q4_k_m
"$BACKPROP" export "$RUN" --format adapter
echo
echo "Done: a GGUF for llama.cpp / Ollama and the PEFT adapter are under $RUN/exports/."
