#!/usr/bin/env bash
# Browser end-to-end test: the real `backprop serve` with the built UI, the Ollama
# stand-in on a free port, a fixture model, and Playwright driving Debian's Chromium
# through drop → train → stop/resume → export → Send to Ollama → chat.
# Screenshots land in target/e2e/ (CI artifacts).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

export BACKPROP_ARTIFACTS="${BACKPROP_ARTIFACTS:-$PWD/target/e2e}"
mkdir -p "$BACKPROP_ARTIFACTS"
rm -f "$BACKPROP_ARTIFACTS"/*.png
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

cargo build --quiet --workspace
bin="$CARGO_TARGET_DIR/debug"
[ -f ui/dist/index.html ] || npm run --silent build

"$bin/backprop" fixture "$work/model" --family qwen2 >/dev/null

# Free ports from the kernel, so parallel runs and other services do not collide.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ollama_port=$(free_port)
"$bin/ollama-standin" --port "$ollama_port" --blobs "$work/blobs" >"$work/ollama.log" 2>&1 &
pids+=($!)

# The Hugging Face hub stand-in serves the same fixture as the repo `test-org/tiny`.
"$bin/hub-standin" --repo "test-org/tiny=$work/model" >"$work/hub.out" 2>&1 &
pids+=($!)
for _ in $(seq 50); do grep -q '^http' "$work/hub.out" 2>/dev/null && break; sleep 0.1; done
export HF_ENDPOINT
HF_ENDPOINT=$(head -n1 "$work/hub.out")
export HF_HUB_CACHE="$work/hf-cache"
unset HF_HUB_OFFLINE HF_TOKEN

export BACKPROP_HOME="$work/home"
OLLAMA_HOST="127.0.0.1:$ollama_port" "$bin/backprop" serve --port 0 --ui-dir ui/dist \
    >"$work/serve.out" 2>"$work/serve.err" &
pids+=($!)
for _ in $(seq 100); do
    grep -q '^listening on ' "$work/serve.out" 2>/dev/null && break
    sleep 0.1
done
url=$(sed -n 's/^listening on //p' "$work/serve.out")
if [ -z "$url" ]; then
    echo "e2e: backprop serve did not start:"; cat "$work/serve.err"; exit 1
fi

export BACKPROP_URL="$url"
export FIXTURE_MODEL="$work/model"
export SAMPLE_DATA="$PWD/assets/samples/alpaca.jsonl"
export OLLAMA_NAME="e2e-model"
export FIXTURE_REPO="test-org/tiny"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
status=0
npx playwright test --config tests/e2e/playwright.config.ts "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- backprop serve stderr ---"; tail -n 50 "$work/serve.err"
fi
echo "e2e: screenshots in $BACKPROP_ARTIFACTS"
exit "$status"
