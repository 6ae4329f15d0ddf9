#!/usr/bin/env bash
# Runs every test: the Rust suites (nextest when installed), doc tests, the Python
# reference checks against Hugging Face transformers and llama.cpp, the web UI's unit
# tests, the browser end-to-end test and the desktop window test.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=env.sh
source scripts/env.sh

# Idempotent: installs only what is missing (apt packages, Rust, tauri-driver).
bash scripts/setup.sh
ensure_python_env
ensure_tracking_env
ensure_ui
cargo build --locked --workspace
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --workspace --no-fail-fast
else
    cargo test --locked --workspace --no-fail-fast
fi
cargo test --locked --workspace --doc
# The tests above regenerate the UI's API types from the Rust structs (ts-rs); a diff
# means they were changed without committing the new types.
if ! git diff --quiet -- ui/src/generated || [ -n "$(git ls-files --others --exclude-standard ui/src/generated)" ]; then
    echo "ui/src/generated is out of date with the Rust types; commit the regenerated files:"
    git status --short ui/src/generated
    exit 1
fi
cargo run --locked -q -p backpropagate --example train_tiny
# The real pretrained model for tests/python/test_real_model.py (once; then cached).
bash scripts/real-model.sh >/dev/null
BACKPROP_BIN="$CARGO_TARGET_DIR/debug/backprop" "$BACKPROP_VENV/bin/python" -m pytest -q tests/python
npm run --silent check
npm test --silent
bash scripts/e2e.sh
bash scripts/desktop-e2e.sh
echo "all tests passed"
