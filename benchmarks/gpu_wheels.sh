#!/usr/bin/env bash
# The Python packages the GPU lease's image lacks, as wheels in .whl/ (ignored by git) for the device tool's
# `carry`: diffusers, at the version installed here (the one the tests pass with). Its needs are in the image
# (/work/.library/device/KINDS.md's package list: huggingface-hub ≥ 1.32, safetensors ≥ 0.8, numpy, Pillow,
# regex, requests, filelock; importlib_metadata it imports only below Python 3.8), so it travels alone,
# with --no-deps. Pure Python: no platform to match. benchmarks/gpu_check.sh installs what .whl/ holds into
# a private folder on the lease, so that the diffusers tests (call 1) and bench_diffusers (call 2) run there.
#
#   bash benchmarks/gpu_wheels.sh
#   then each device call: run(command='bash benchmarks/gpu_check.sh call1 "$OUT"', carry=[".whl"])
#
# Environment: PYTHON (default .venv/bin/python: the diffusers version to fetch is the one it imports),
# DIFFUSERS_VERSION to fetch another.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
VERSION="${DIFFUSERS_VERSION:-$("$PY" -c 'import diffusers; print(diffusers.__version__)')}"
rm -rf "$ROOT/.whl"
mkdir -p "$ROOT/.whl"
# the lease's python is 3.12: ask for wheels that install there, not for this interpreter's version
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$ROOT/.whl" \
  "diffusers==$VERSION"
ls -l "$ROOT/.whl" >&2
