#!/usr/bin/env bash
# Installs what building and testing Backpropagate needs on Debian/Ubuntu: a C
# toolchain (the tokenizer's regex engine builds C), pkg-config, Python venv support,
# and Rust (via rustup) when cargo is missing.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
for pkg in build-essential pkg-config python3 python3-venv curl ca-certificates; do
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
echo "setup: ok ($(cargo --version))"
