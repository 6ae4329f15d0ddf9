#!/usr/bin/env bash
# Compile-checks the CUDA build (`--features cuda`) with clippy on a machine without a
# GPU: candle's kernels need nvcc, which PyPI ships (CUDA 13.0 wheels; 12.x wheels have
# no nvcc, and cudarc in candle 0.9 does not know 13.5 yet). Nothing here needs a GPU
# or a driver; running the result does.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=env.sh
source scripts/env.sh
CUDA_VENV="${CUDA_VENV:-$HOME/.cache/backpropagate/cuda-venv}"
if [ ! -x "$CUDA_VENV/bin/python" ]; then
    python3 -m venv "$CUDA_VENV"
fi
"$CUDA_VENV/bin/pip" install --quiet \
    "nvidia-cuda-nvcc~=13.0.0" "nvidia-cuda-crt~=13.0.0" "nvidia-cuda-runtime~=13.0.0" \
    "nvidia-cuda-cccl~=13.0.0" "nvidia-nvvm~=13.0.0"
CUDA_ROOT=$("$CUDA_VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
if [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
    echo "cuda-check: no nvcc under $CUDA_ROOT" >&2
    exit 1
fi
export CUDA_ROOT CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
# Kernels are compiled for one architecture here (sm_80, Ampere); release builds pick
# theirs on the build machine.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
# Its own target dir: the cuda feature would otherwise rebuild candle for every other
# cargo command sharing the default one.
CARGO_TARGET_DIR="$HOME/.cache/backpropagate/target-cuda" \
    cargo clippy --locked -p backpropagate --features cuda --all-targets -- -D warnings
echo "cuda-check: ok ($(nvcc --version | tail -1))"
