#!/usr/bin/env sh
# Install torch into the interpreter given as $1 without ever pulling CUDA packages on a CPU machine.
#   - already importable: nothing to do;
#   - an NVIDIA GPU is present: the default PyPI build (CUDA);
#   - a local CPU wheel reachable through pip's find-links (as on the project's CI machines): that wheel;
#   - otherwise: the CPU build from the PyTorch CPU index.
set -eu
PY="$1"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if "$PY" -c "import torch" 2>/dev/null; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing torch==$TORCH_VERSION (CUDA build)"
    "$PY" -m pip install "torch==$TORCH_VERSION"
    exit 0
fi
tmp=$(mktemp -d)
if "$PY" -m pip download --quiet --no-deps --no-index -d "$tmp" "torch==$TORCH_VERSION" >/dev/null 2>&1 \
   && ls "$tmp" | grep -q '+cpu'; then
    echo "installing the local CPU wheel of torch==$TORCH_VERSION"
    "$PY" -m pip install "$tmp"/torch-*.whl
else
    echo "installing torch==$TORCH_VERSION from the PyTorch CPU index"
    "$PY" -m pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
fi
rm -rf "$tmp"
