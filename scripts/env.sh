# Shared settings for the scripts: sourced, not run.
# The cargo target dir and the Python venv live outside the checkout so that fresh
# clones (CI) reuse earlier builds and downloads.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/backpropagate/target}"
BACKPROP_VENV="${BACKPROP_VENV:-$HOME/.cache/backpropagate/venv}"
export BACKPROP_VENV
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/backpropagate/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# A real small pretrained model (scripts/real-model.sh), used by the demo when present.
export BACKPROP_REAL_MODEL="${BACKPROP_REAL_MODEL:-$HOME/.cache/backpropagate/models/SmolLM2-135M-Instruct}"

# Creates the venv with the Python reference stack (transformers etc.) once, and
# again whenever tests/python/requirements.txt changes.
ensure_python_env() {
    local req="tests/python/requirements.txt"
    local stamp="$BACKPROP_VENV/.requirements.sha256"
    local want
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ ! -x "$BACKPROP_VENV/bin/python" ]; then
        python3 -m venv "$BACKPROP_VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # llama-cpp-python compiles llama.cpp: only the library, portable CPU code.
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" \
            "$BACKPROP_VENV/bin/pip" install --quiet -r "$req"
        echo "$want" > "$stamp"
    fi
}

# The experiment trackers our files are checked against (TensorBoard), in a venv of
# their own (tests/python/tracking-requirements.txt), once and whenever the pins change.
BACKPROP_TRACKING_VENV="${BACKPROP_TRACKING_VENV:-$HOME/.cache/backpropagate/tracking-venv}"
export BACKPROP_TRACKING_VENV
ensure_tracking_env() {
    local req="tests/python/tracking-requirements.txt"
    local stamp="$BACKPROP_TRACKING_VENV/.requirements.sha256"
    local want
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ ! -x "$BACKPROP_TRACKING_VENV/bin/python" ]; then
        python3 -m venv "$BACKPROP_TRACKING_VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$BACKPROP_TRACKING_VENV/bin/pip" install --quiet -r "$req"
        echo "$want" > "$stamp"
    fi
}

# Installs the web UI's npm packages when package-lock.json changed, and builds ui/dist
# (the desktop binary embeds it, `backprop serve` serves it).
ensure_ui() {
    local stamp="node_modules/.lock.sha256"
    local want
    want=$(cat package-lock.json ui/package.json | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
        echo "$want" > "$stamp"
    fi
    npm run --silent build
}
