#!/usr/bin/env bash
# Runs every test: the Rust suites (nextest when installed), doc tests, and the Python
# reference checks that compare us with Hugging Face transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=env.sh
source scripts/env.sh

ensure_python_env
cargo build --locked -p backprop-cli
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --workspace --no-fail-fast
else
    cargo test --locked --workspace --no-fail-fast
fi
cargo test --locked --workspace --doc
cargo run --locked -q -p backpropagate --example train_tiny
BACKPROP_BIN="$CARGO_TARGET_DIR/debug/backprop" "$BACKPROP_VENV/bin/python" -m pytest -q tests/python
echo "all tests passed"
