#!/usr/bin/env bash
# The CUDA extension built here, before a GPU lease, for the lease's machine — its python (3.12), its torch
# (2.11.0, CUDA 13.0; /work/.library/device/KINDS.md) and its device's arch (sm_90) — into .prebuilt/ (ignored
# by git) for the device tool's `carry`. benchmarks/gpu_check.sh loads it instead of building on the lease
# when its key matches (the same build sources, torch, Python ABI and arch: `gpu_check.sh prebuilt-key`) and
# it imports with CUDA there; else it builds there as before. The lease's build is ~3 of its 15 minutes of
# device time (16 cores); here it takes ~12 min on 2 cores (738 s on 2026-12-02), and CPU minutes are not
# scarce. METHOD.md: "compile here ... and carry the outputs with the call"; H200.md: a binary built here may
# not run there (other system libraries), so the lease tries it and falls back.
#
#   bash benchmarks/gpu_prebuild.sh
#   then each device call: run(command='bash benchmarks/gpu_check.sh call1 "$OUT"', carry=[".whl", ".prebuilt"])
#
# Build it from the tree you will carry: an edit of setup.py or csrc/ afterwards changes the key, and the
# lease then builds as it would without it.
# Environment: PYTHON312 (a Python 3.12; default python3.12 on PATH, else pyenv's newest 3.12), LEASE_TORCH
# (default 2.11.0), ARCH (default 9.0), LEASE_VENV (the venv with that torch; default
# ~/.cache/diffusion_ext/lease-py312-torch$LEASE_TORCH, kept and reused: the install is ~4 GB).
# The CPU kernels are built for x86-64-v3 (AVX2, FMA), not this machine's -march=native: the lease's CPU is
# another one, and an instruction it lacks would kill the tests there (SIGILL).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LEASE_TORCH="${LEASE_TORCH:-2.11.0}"
ARCH="${ARCH:-9.0}"
# the first candidate that runs as a 3.12 (pyenv's shim on PATH answers for a version it has not selected)
PY312=""
for c in ${PYTHON312:-} python3.12 $(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do
  if "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then PY312=$c; break; fi
done
[ -n "$PY312" ] || { echo "gpu_prebuild.sh: no Python 3.12 found (set PYTHON312)" >&2; exit 2; }
VENV="${LEASE_VENV:-$HOME/.cache/diffusion_ext/lease-py312-torch$LEASE_TORCH}"

if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$LEASE_TORCH')" 2>/dev/null
then
  echo "gpu_prebuild.sh: a venv with Python 3.12 and torch $LEASE_TORCH at $VENV" >&2
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-compile "torch==$LEASE_TORCH" ninja setuptools wheel numpy
fi

# What the lease receives: tracked files and untracked ones git does not ignore (the device tool's rule).
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC")

echo "gpu_prebuild.sh: building sm ${ARCH} against $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') ($(nproc) jobs)" >&2
t0=$SECONDS
(
  cd "$SRC"
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  export PATH="$CUDA_HOME/bin:$PATH" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
         DIFFUSION_EXT_CPU_ARCH=x86-64-v3 DIFFUSION_EXT_PTXAS_VERBOSE=1
  "$VENV/bin/python" setup.py build_ext --inplace > build.log 2>&1
) || { tail -n 60 "$SRC/build.log" >&2; echo "gpu_prebuild.sh: the build failed" >&2; exit 1; }
echo "gpu_prebuild.sh: built in $((SECONDS - t0)) s" >&2

# It must import with its CUDA kernels registered here (a CUDA build of torch imports without a GPU).
(cd "$SRC" && "$VENV/bin/python" -c '
import diffusion_ext
info = diffusion_ext.build_info()
assert "cuda" in info["backends"], info
print("gpu_prebuild.sh: imports, with", info)') >&2

OUTD="$ROOT/.prebuilt"
rm -rf "$OUTD"
mkdir -p "$OUTD"
cp "$SRC"/diffusion_ext/_C.*.so "$OUTD/"
# without its DWARF (torch's build passes -g): 54 MB -> 16 MB of the call's 64 MiB carry; symbols kept
strip --strip-debug "$OUTD"/_C.*.so
"$VENV/bin/python" "$SRC/scripts/cuda_resources.py" "$SRC/build.log" --arch "${ARCH/./}" \
  --markdown "$OUTD/cuda-resources.md" >&2
PYTHON="$VENV/bin/python" bash "$SRC/benchmarks/gpu_check.sh" prebuilt-key "$ARCH" > "$OUTD/KEY"
echo "gpu_prebuild.sh: wrote $OUTD: $(cd "$OUTD" && du -sh --apparent-size . | cut -f1) ($(ls "$OUTD" | tr '\n' ' '))" >&2
echo "gpu_prebuild.sh: key $(cat "$OUTD/KEY")" >&2
