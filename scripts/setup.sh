#!/usr/bin/env bash
# Installs what building and testing Backpropagate needs on Debian/Ubuntu: a C
# toolchain (the tokenizer's regex engine builds C), pkg-config, Python venv support,
# and Rust (via rustup) when cargo is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
# The desktop window builds on WebKitGTK; the UI tests drive Debian's Chromium, and the
# desktop test drives the real window under Xvfb through WebKitWebDriver. Go's own
# text/template renders Ollama templates in the template-equality tests.
for pkg in build-essential pkg-config python3 python3-venv curl ca-certificates \
    libwebkit2gtk-4.1-dev libgtk-3-dev librsvg2-dev \
    chromium xvfb xauth webkit2gtk-driver golang-go; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        echo "setup: cargo is in ~/.cargo/bin; run: source ~/.cargo/env"
    else
        echo "setup: installing Rust with rustup"
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
    fi
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi
# The web UI is built with Node.js (20.19 or newer, as Vite requires).
if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a==20&&b>=19)?0:1)' 2>/dev/null; then
    echo "setup: Node.js 20.19+ is needed for the web UI (found: $(node --version 2>/dev/null || echo none))."
    echo "       Install it from https://nodejs.org (or your package manager) and run this again."
    exit 1
fi

# tauri-driver bridges WebDriver to the desktop window for the desktop test.
if ! command -v tauri-driver >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tauri-driver" ]; then
    echo "setup: installing tauri-driver (once)"
    cargo install --quiet --locked tauri-driver
fi
echo "setup: ok ($(cargo --version), node $(node --version))"
