#!/usr/bin/env bash
# Installs labelassist with the `sam,yolo` extras into a virtual environment. This is the one install
# recipe: the container image runs it (docker/Dockerfile), and the tests run it into a fresh virtual
# environment (tests/test_docker.py), so what CI checks is what the image gets.
#
#   docker/install.sh VENV [TORCH_INDEX] [PROJECT_DIR]
#
# VENV         the virtual environment to create (or reuse) and install into
# TORCH_INDEX  a PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu (CPU-only wheels) or
#              https://download.pytorch.org/whl/cu126 (CUDA 12.6); empty: torch from PyPI (whose
#              Linux wheels are CUDA builds that also run on the CPU)
# PROJECT_DIR  the labelassist source tree (default: this script's repository)
#
# torch and torchvision come from TORCH_INDEX first and are then held to the versions installed
# (a pip constraint), so installing the project from PyPI cannot swap them for other builds.
# pip's cache follows pip's own settings: the image sets PIP_NO_CACHE_DIR=1.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
    echo "usage: $0 VENV [TORCH_INDEX] [PROJECT_DIR]" >&2
    exit 64
fi
venv=$1
torch_index=${2:-}
project=${3:-$(cd "$(dirname "$0")/.." && pwd)}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)

if [ -n "$torch_index" ]; then
    echo "install.sh: torch and torchvision from $torch_index"
    "${pip[@]}" install --index-url "$torch_index" torch torchvision
else
    echo "install.sh: torch and torchvision from PyPI"
    "${pip[@]}" install torch torchvision
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"${pip[@]}" freeze | grep -E '^(torch|torchvision)==' > "$constraints"
echo "install.sh: holding $(tr '\n' ' ' < "$constraints")"

"${pip[@]}" install --constraint "$constraints" "$project[sam,yolo]"

# The same smoke test everywhere: the command runs and reports the torch it got.
"$venv/bin/labelassist" --help > /dev/null
"$venv/bin/python" -c 'import torch, labelassist; print("install.sh: ok, torch", torch.__version__)'
