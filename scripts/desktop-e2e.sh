#!/usr/bin/env bash
# The desktop window for real: the Tauri app under Xvfb, driven through tauri-driver and
# WebKitWebDriver (Debian's webkit2gtk-driver) by tests/desktop/window.mjs.
# Screenshots land in target/desktop/ (CI artifacts).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export PATH="$HOME/.cargo/bin:$PATH"

export BACKPROP_ARTIFACTS="${BACKPROP_ARTIFACTS_DESKTOP:-$PWD/target/desktop}"
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

[ -f ui/dist/index.html ] || npm run --silent build
cargo build --quiet --workspace
bin="$CARGO_TARGET_DIR/debug"
"$bin/backprop" fixture "$work/model" --family qwen2 >/dev/null

# A display of its own, so the test never lands on someone's desktop.
display=":$(( 90 + RANDOM % 100 ))"
Xvfb "$display" -screen 0 1400x900x24 -nolisten tcp >"$work/xvfb.log" 2>&1 &
pids+=($!)
export DISPLAY="$display"
# No GPU under Xvfb; root cannot use WebKit's bubblewrap sandbox.
export WEBKIT_DISABLE_COMPOSITING_MODE=1 LIBGL_ALWAYS_SOFTWARE=1
if [ "$(id -u)" -eq 0 ]; then export WEBKIT_DISABLE_SANDBOX_THIS_IS_DANGEROUS=1; fi
export BACKPROP_HOME="$work/home"
export OLLAMA_HOST="127.0.0.1:9"   # nothing there: the app must cope

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
native=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tauri-driver --port "$port" --native-port "$native" >"$work/driver.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
    curl -s "http://127.0.0.1:$port/status" >/dev/null 2>&1 && break
    sleep 0.2
done

status=0
WEBDRIVER_URL="http://127.0.0.1:$port" \
    node tests/desktop/window.mjs "$bin/backpropagate" "$work/model" "$PWD/assets/samples/alpaca.jsonl" || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- tauri-driver log ---"; tail -n 40 "$work/driver.log"
fi
echo "desktop: screenshots in $BACKPROP_ARTIFACTS"
exit "$status"
