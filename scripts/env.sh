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

# Creates venv $1 with the pinned requirements file $2 once, and installs them again
# whenever that file changes (a hash of it is kept in the venv).
ensure_venv() {
    local venv="$1" req="$2"
    local stamp="$venv/.requirements.sha256"
    local want
    want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        # llama-cpp-python compiles llama.cpp: only the library, portable CPU code.
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" \
            "$venv/bin/pip" install --quiet -r "$req"
        echo "$want" > "$stamp"
    fi
}

# The Python reference stack (transformers, PEFT, llama.cpp etc.).
ensure_python_env() {
    ensure_venv "$BACKPROP_VENV" tests/python/requirements.txt
}

# The experiment trackers our files are checked against (TensorBoard, wandb), in a
# venv of their own, so their pins never move the reference stack.
BACKPROP_TRACKING_VENV="${BACKPROP_TRACKING_VENV:-$HOME/.cache/backpropagate/tracking-venv}"
export BACKPROP_TRACKING_VENV
ensure_tracking_env() {
    ensure_venv "$BACKPROP_TRACKING_VENV" tests/python/tracking-requirements.txt
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
