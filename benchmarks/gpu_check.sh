#!/usr/bin/env bash
# GPU check: build diffusion_ext with its CUDA kernels, run every test (the gpu-marked ones too), run the
# CUDA op tests again under compute-sanitizer memcheck, run the benchmarks (ops, UNet steps, sampling loop), and write
#   benchmarks/results/<device-name>-<YYYY-MM-DD>.md
# with the device, the versions, the build, the test and sanitizer summaries and the benchmark table.
# Every number in that file comes from this run.
#
#   bash benchmarks/gpu_check.sh
#
# Environment (all optional):
#   TORCH_SPEC        pip requirement(s) for torch (default: torch==2.14.1, the CUDA 13 build on PyPI);
#                     split on spaces, so "torch==2.14.1 --index-url URL" works
#   VENV              the venv to create (default: ./venv-gpu, which git ignores)
#   PYTHON            the interpreter that creates the venv (default: python3)
#   USE_CURRENT_ENV=1 make no venv and install nothing but this package: use the python on PATH as it is
#                     (a machine whose image already holds torch with CUDA, Triton and pytest)
#   TORCH_CUDA_ARCH_LIST  the archs to build (default: 9.0, Hopper)
#   SKIP_SANITIZER=1  skip the compute-sanitizer run
#   LOG_DIR           where the full logs go (default: ./build/gpu_check, which git ignores)
#
# The editable install builds diffusion_ext/_C*.so inside this checkout against the venv's torch: run it
# in a checkout of its own, not one whose CPU build another venv is using.
# The script goes on after a failing step, writes the results file, and exits non-zero at the end.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '\n=== %s\n' "$*" >&2; }
die() { printf 'gpu_check.sh: %s\n' "$*" >&2; exit 1; }

command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this script needs an NVIDIA GPU and its driver"
GPU_LINE="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
[ -n "$GPU_LINE" ] || die "nvidia-smi lists no GPU"
GPU_NAME="$(printf '%s' "$GPU_LINE" | cut -d, -f1 | sed -E 's/^ +| +$//g')"
DATE="$(date +%Y-%m-%d)"
SLUG="$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
RESULTS_DIR="$ROOT/benchmarks/results"
RESULT="$RESULTS_DIR/${SLUG:-gpu}-$DATE.md"
LOG_DIR="${LOG_DIR:-$ROOT/build/gpu_check}"
mkdir -p "$RESULTS_DIR" "$LOG_DIR"

# ---------------------------------------------------------------------------------------------------
# 1. environment
# ---------------------------------------------------------------------------------------------------
if [ "${USE_CURRENT_ENV:-0}" = "1" ]; then
  log "using the current environment: $(command -v python3)"
  PY="$(command -v python3)"
else
  VENV="${VENV:-$ROOT/venv-gpu}"
  log "creating venv $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  PY="$VENV/bin/python"
  "$PY" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086  # TORCH_SPEC may hold several words on purpose
  "$PY" -m pip install ${TORCH_SPEC:-torch==2.14.1}
  "$PY" -m pip install triton ninja setuptools wheel numpy
fi
PY_BIN_DIR="$(dirname "$PY")"
export PATH="$PY_BIN_DIR:$PATH"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"

NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  for cand in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -x "$cand" ]; then NVCC="$cand"; break; fi
  done
fi
[ -n "$NVCC" ] || die "nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): install the CUDA toolkit that matches torch's CUDA"
export CUDA_HOME="${CUDA_HOME:-$(cd "$(dirname "$NVCC")/.." && pwd)}"
export PATH="$(dirname "$NVCC"):$PATH"

# ---------------------------------------------------------------------------------------------------
# 2. build with CUDA
# ---------------------------------------------------------------------------------------------------
log "building diffusion_ext with CUDA (archs ${TORCH_CUDA_ARCH_LIST:-9.0}, nvcc $NVCC)"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  "$PY" -m pip install --no-build-isolation -e ".[test]" 2>&1 | tee "$LOG_DIR/build.log"

VERSIONS="$("$PY" - <<'PY'
import torch, diffusion_ext
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"- torch sees: {torch.cuda.get_device_name(0)} (capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})")
print(f"- diffusion_ext.build_info(): {diffusion_ext.build_info()}")
print(f"- available backends for cuda tensors: {diffusion_ext.available_backends('cuda')}")
PY
)"
NVCC_VERSION="$("$NVCC" --version | tail -n 2 | tr '\n' ' ')"
"$PY" -c 'import diffusion_ext, sys; sys.exit(0 if "cuda" in diffusion_ext.build_info()["backends"] else 1)' \
  || die "the build holds no CUDA kernels; see $LOG_DIR/build.log"

FAILED=()

# pytest's closing lines: FAILED/ERROR lines and the "N passed, ..." summary.
# (compute-sanitizer's own lines start with "=========" and are left out.)
summary() { grep -v '^=========' "$1" | grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed|error|errors|skipped|deselected)' | tail -n 40 || true; }

# ---------------------------------------------------------------------------------------------------
# 3. every test
# ---------------------------------------------------------------------------------------------------
log "pytest python_tests -q"
set +e
"$PY" -m pytest python_tests -q -p no:cacheprovider 2>&1 | tee "$LOG_DIR/pytest.log"
PYTEST_RC=${PIPESTATUS[0]}
set -e
[ "$PYTEST_RC" = 0 ] || FAILED+=("pytest (exit $PYTEST_RC)")

# ---------------------------------------------------------------------------------------------------
# 4. the CUDA op tests under compute-sanitizer memcheck
# ---------------------------------------------------------------------------------------------------
SANITIZER="$(command -v compute-sanitizer || true)"
for cand in "$CUDA_HOME/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  if [ -z "$SANITIZER" ] && [ -x "$cand" ]; then SANITIZER="$cand"; fi
done
if [ "${SKIP_SANITIZER:-0}" = "1" ]; then
  SANITIZER_SUMMARY="skipped (SKIP_SANITIZER=1)"
elif [ -z "$SANITIZER" ]; then
  SANITIZER_SUMMARY="skipped: compute-sanitizer not found on PATH or under \$CUDA_HOME/bin, /usr/local/cuda/bin"
else
  log "compute-sanitizer --tool memcheck: pytest python_tests -k cuda"
  set +e
  # No caching allocator, so that an access past a tensor's end falls outside any allocation.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest python_tests -q -p no:cacheprovider -k cuda 2>&1 | tee "$LOG_DIR/sanitizer.log"
  SAN_RC=${PIPESTATUS[0]}
  set -e
  [ "$SAN_RC" = 0 ] || FAILED+=("compute-sanitizer memcheck (exit $SAN_RC)")
  SANITIZER_SUMMARY="$(printf 'command: PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest python_tests -q -k cuda\nexit code: %s\n' "$SAN_RC"
    grep -E 'ERROR SUMMARY|LEAK SUMMARY' "$LOG_DIR/sanitizer.log" | tail -n 5 || true
    summary "$LOG_DIR/sanitizer.log")"
fi

# ---------------------------------------------------------------------------------------------------
# 5. the benchmark
# ---------------------------------------------------------------------------------------------------
log "python -m diffusion_ext bench --device cuda"
BENCH_MD="$LOG_DIR/bench-cuda.md"
rm -f "$BENCH_MD"
set +e
"$PY" -m diffusion_ext bench --device cuda --markdown "$BENCH_MD" 2>&1 | tee "$LOG_DIR/bench.log"
BENCH_RC=${PIPESTATUS[0]}
set -e
[ "$BENCH_RC" = 0 ] || FAILED+=("bench (exit $BENCH_RC)")

# One markdown table per benchmark script: bench_table NAME COMMAND... writes $LOG_DIR/bench-NAME.md (stdout)
# and .log (stderr), records a failure without stopping the others, and leaves the exit code in NAME_RC.
bench_table() {
  local name=$1; shift
  log "$*"
  rm -f "$LOG_DIR/bench-$name.md"
  set +e
  "$@" > "$LOG_DIR/bench-$name.md" 2> "$LOG_DIR/bench-$name.log"
  local rc=$?
  set -e
  [ "$rc" = 0 ] || FAILED+=("bench-$name (exit $rc)")
  printf -v "${name//-/_}_RC" '%s' "$rc"
}
unet_tables() { "$PY" benchmarks/bench_unet.py cuda && echo && (cd benchmarks && "$PY" profile_unet_step.py cuda); }
bench_table group-norm-act "$PY" benchmarks/bench_group_norm_act.py cuda
bench_table attention "$PY" benchmarks/bench_attention.py cuda
bench_table unet unet_tables
bench_table sampling-loop "$PY" benchmarks/bench_sampling_loop.py cuda
bench_table training-noise "$PY" benchmarks/bench_training_noise.py cuda

# ---------------------------------------------------------------------------------------------------
# 6. the results file
# ---------------------------------------------------------------------------------------------------
table_section() {  # NAME TITLE: the table bench_table wrote, or why there is none
  local rc_var="${1//-/_}_RC"
  echo
  echo "## Benchmark: $2"
  echo
  if [ -s "$LOG_DIR/bench-$1.md" ]; then
    cat "$LOG_DIR/bench-$1.md"
  else
    echo "no table: exit ${!rc_var}; see $LOG_DIR/bench-$1.log"
  fi
}

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null || true)" ]; then COMMIT="$COMMIT (with local changes)"; fi
{
  echo "# diffusion_ext GPU check: $GPU_NAME, $DATE"
  echo
  echo "Written by \`benchmarks/gpu_check.sh\` at commit $COMMIT. Full logs were in $LOG_DIR."
  echo
  echo "## Machine and build"
  echo
  echo "- nvidia-smi (name, memory.total, driver_version): $GPU_LINE"
  echo "- nvcc: $NVCC_VERSION"
  echo "$VERSIONS"
  echo
  echo "## Tests: \`pytest python_tests -q\` (gpu-marked tests included)"
  echo
  echo "exit code: $PYTEST_RC"
  echo
  echo '```'
  summary "$LOG_DIR/pytest.log"
  echo '```'
  echo
  echo "## compute-sanitizer memcheck over the CUDA op tests"
  echo
  echo '```'
  echo "$SANITIZER_SUMMARY"
  echo '```'
  echo
  echo "## Benchmark: \`python -m diffusion_ext bench --device cuda\`"
  echo
  if [ -s "$BENCH_MD" ]; then
    sed -e '1{/^# /d}' "$BENCH_MD"
  else
    echo "no table: the benchmark exited with $BENCH_RC; see $LOG_DIR/bench.log"
  fi
  echo
  table_section "group-norm-act" "\`python benchmarks/bench_group_norm_act.py cuda\` (32 groups, SiLU; eager, compile, cuda, triton)"
  table_section "attention" "\`python benchmarks/bench_attention.py cuda\` (eager, compile, every SDPA backend, cuda, triton)"
  table_section "unet" "\`python benchmarks/bench_unet.py cuda\` (UNet train and sampling step, bf16 autocast, batch 64) and \`profile_unet_step.py cuda\`"
  table_section "sampling-loop" "\`python benchmarks/bench_sampling_loop.py cuda\` (1000-step DDPM loop: eager, fused, CUDA graph)"
  table_section "training-noise" "\`python benchmarks/bench_training_noise.py cuda\` (the trainer's per-sample noise: B calls vs one)"
} > "$RESULT"
log "wrote $RESULT"

if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'gpu_check.sh: failed: %s\n' "${FAILED[*]}" >&2
  exit 1
fi
