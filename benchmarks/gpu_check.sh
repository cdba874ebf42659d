#!/usr/bin/env bash
# What one GPU lease runs: two calls of at most ~7 minutes each on an H100/H200 host (16 cores), no network,
# each writing at most 8 files into the folder it is given (the lease's $OUT), then, back on the CPU
# machine, the results file is assembled from what came back and committed.
#
# Before the lease, here: `bash benchmarks/gpu_wheels.sh` puts the diffusers wheel into .whl/ (the lease's
# image has no diffusers; without it the diffusers tests skip and its table says "not installed"), and
# `bash benchmarks/gpu_prebuild.sh` builds the CUDA extension for the lease's python, torch and sm_90 into
# .prebuilt/ (~12 min on 2 cores here), which the build stage loads instead of building when it was built from these
# sources and imports there (else it builds: ~3 of the lease's minutes).
# The two device calls, verbatim (the device tool's `run`, with carry [".whl", ".prebuilt"]; its command line
# must stay under 2,000 chars):
#   call 1:  bash benchmarks/gpu_check.sh call1 "$OUT"
#   call 2:  bash benchmarks/gpu_check.sh call2 "$OUT"
# and afterwards, here:
#            bash benchmarks/gpu_check.sh assemble DIR_OF_CALL1 DIR_OF_CALL2
#              -> benchmarks/results/<gpu>-<date>.md (commit it; README quotes it)
# CI runs `bash benchmarks/gpu_check.sh --dry-run all DIR` on a machine without a GPU: every stage walks
# the same steps with the CUDA parts skipped or on the CPU, so a broken script is found there.
#
# Plan (minutes on an H200 host; each stage has a time limit, prints how long it took, and the script
# always writes its summary, whatever failed):
#   call 1  env (0.1) · the carried build if it fits (0.1), else build for the device's arch only, all cores
#           (~3, limit 5) · every gpu-marked test
#           and the fuzz tests (CUDA draws), pytest-xdist (~2, limit 3) · compute-sanitizer memcheck over
#           benchmarks/cuda_smoke.py, every
#           CUDA kernel once (~1, limit 2) · with the carried build only, racecheck over the same (limit 2)
#                                                                            files: 1-*.log, 1-summary.md
#   call 2  build again only if the machine is a fresh one (the lease keeps a machine 30 s after a call:
#           issue call 2 at once) · schedule ops and dropout at 16.8M elements with the copy bandwidth (~0.5) ·
#           group norm 64×256×32×32 NCHW/NHWC (~1) · attention (16,8,1024,64), (64,4,256,32) (~1) ·
#           UNet train/sampling step, batch 64, bf16 (~2) · 250-step sampling loop, batch 16 (~1.5) ·
#           diffusers UNet2DModel patched vs unpatched, batch 64, bf16, no compile (~0.5) and its scheduler
#           steps, DDPM, DDIM, DPM-Solver++ (~0.3)
#                                                                            files: 2-*.md, 2-bench.log
# What to drop first when a call runs long: in call 1 the racecheck (SKIP_RACECHECK=1), the sanitizer
# (SKIP_SANITIZER=1: both), then the tests'
# Triton half (GPU_TESTS="-m 'gpu or fuzz' -k 'not triton'"); in call 2 the sampling loop (SKIP=sampling), then the
# UNet's compile rows (UNET_ARGS=) and the attention table (SKIP="sampling attention"). With time to spare,
# DIFFUSERS_ARGS="--reps 3" adds the torch.compile rows to the diffusers table (~2-3 min more).
#
# Environment: PYTHON (default python3: on the lease that python holds torch with CUDA, Triton and
# pytest-xdist; nothing is downloaded, and only the carried wheels of .whl/ are installed, into a private
# folder), TORCH_CUDA_ARCH_LIST (default: the device's own),
# WORKERS (pytest-xdist workers, default 12), SKIP (stages of call 2 to leave out: schedule gn attention
# unet sampling diffusers), SKIP_SANITIZER=1, SKIP_RACECHECK=1, DIFFUSERS_ARGS (bench_diffusers.py's options after the device,
# default "--reps 3 --no-compile").
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
WHAT="${1:-}"
OUT="${2:-}"
usage() { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] call1|call2|all OUTDIR | assemble DIR1 DIR2 | prebuilt-key ARCH" >&2; exit 2; }
[ -n "$WHAT" ] && [ -n "$OUT" ] || usage

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
SUMMARY=""        # the current call's summary file
STAGES=()         # "name: status (seconds)" of each stage of this call
note() { printf '%s\n' "$*" | tee -a "$SUMMARY" >&2; }
# stage NAME LIMIT_SECONDS LOG COMMAND...: runs COMMAND with a time limit, output appended to LOG, and
# records its status and time; never exits the script.
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS rc
  printf '\n=== %s (limit %ss): %s\n' "$name" "$limit" "$*" | tee -a "$log" >&2
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local status="ok"
  [ "$rc" = 0 ] || status="FAILED (exit $rc)"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status="STOPPED at its ${limit} s limit"
  STAGES+=("$name: $status, $((SECONDS - t0)) s")
  printf '=== %s: %s in %s s\n' "$name" "$status" "$((SECONDS - t0))" | tee -a "$log" >&2
  return 0
}
stages_md() { local s; for s in "${STAGES[@]}"; do echo "- $s"; done; }
stages_section() { note ""; note "## Stages"; stages_md | tee -a "$SUMMARY" >&2; }
start_summary() {  # FILE TITLE: a new summary that begins with the machine's lines
  SUMMARY=$1; STAGES=()
  : > "$SUMMARY"
  note "# $2"
  note ""
  env_lines | tee -a "$SUMMARY" >&2
}

env_lines() {
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (with local changes)')"
  if [ "$DRY" = 1 ]; then
    echo "- dry run on $(uname -n): no GPU used"
  else
    echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)"
    echo "- nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
  fi
  "$PY" - <<'PY' 2>&1
import os, platform, torch
print(f"- python {platform.python_version()} ({os.sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{os.cpu_count()} CPUs")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"- device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
try:
    import triton
    print(f"- triton {triton.__version__}")
except ImportError as e:
    print(f"- triton: not importable ({e})")
PY
}

# The wheels benchmarks/gpu_wheels.sh put into .whl/ (carried to the lease: its image has no diffusers),
# installed into a private folder that PYTHONPATH then names: nothing in the image's site-packages changes.
SITE=""
CARRIED=0         # 1 once the carried build is in place (use_prebuilt): call 1 then has time for racecheck
carried_wheels() {  # LOG
  local whl=("$ROOT"/.whl/*.whl)
  if [ ! -e "${whl[0]}" ]; then
    note "- carried wheels: none (.whl/ is empty; \`bash benchmarks/gpu_wheels.sh\` and carry .whl for the diffusers rows)"
    return
  fi
  SITE="${TMPDIR:-/tmp}/diffusion_ext-carried-site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
       "${whl[@]}" >> "$1" 2>&1; then
    note "- carried wheels installed into $SITE: $(cd "$ROOT/.whl" && echo *.whl)"
  else
    note "- carried wheels: pip install failed (see $(basename "$1")); going on without them"
    SITE=""
  fi
  note "- diffusers: $(PYTHONPATH="$(python_path)" "$PY" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null ||
    echo 'not importable: its tests skip and its table says so')"
}
python_path() { echo "$ROOT${SITE:+:$SITE}"; }

device_arch() {  # "9.0" for an H100/H200
  "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.major}.{p.minor}")'
}

extension_has_cuda() {
  PYTHONPATH="$ROOT" "$PY" -c 'import diffusion_ext, sys; sys.exit(0 if "cuda" in diffusion_ext.build_info()["backends"] else 1)' 2>/dev/null
}

# What a build of the extension depends on: the sources setup.py compiles (a digest of setup.py and csrc/),
# the torch it is built against (its CUDA variant included), the Python ABI and the CUDA arch.
source_digest() {
  (cd "$ROOT" && find setup.py csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}
prebuilt_key() {  # ARCH
  echo "sources $(source_digest), $("$PY" -c 'import sysconfig, torch
print("torch " + torch.__version__ + ", python " + sysconfig.get_config_var("EXT_SUFFIX"))'), sm $1"
}

# The extension gpu_prebuild.sh built on the CPU machine and the call carried (.prebuilt/), put in place when
# its key is this machine's and it imports with CUDA; 1 (build here) otherwise, with the reason noted.
use_prebuilt() {  # ARCH
  local dir="$ROOT/.prebuilt" want have
  if [ ! -f "$dir/KEY" ]; then note "- carried build: none (.prebuilt/; benchmarks/gpu_prebuild.sh): building here"; return 1; fi
  want="$(prebuilt_key "$1")"
  have="$(cat "$dir/KEY")"
  if [ "$want" != "$have" ]; then
    note "- carried build: for another build (carried: $have; here: $want): building here"
    return 1
  fi
  cp "$dir"/_C.*.so "$ROOT/diffusion_ext/"
  if ! extension_has_cuda; then
    rm -f "$ROOT"/diffusion_ext/_C.*.so
    note "- carried build: does not import with CUDA here: building here"
    return 1
  fi
  note "- carried build ($have): imports with CUDA; not built here"
  CARRIED=1
  [ -n "${OUT:-}" ] && [[ "$WHAT" != call2 ]] && cp "$dir/cuda-resources.md" "$OUT/1-cuda-resources.md"
  STAGES+=("build: the carried one (benchmarks/gpu_prebuild.sh), 0 s")
  return 0
}

build() {  # LOG
  local log=$1
  if [ "$DRY" = 1 ]; then
    note "- carried build: a dry run builds nothing; this tree's key for sm 9.0: $(prebuilt_key 9.0)"
    stage "build (dry run: the CPU build in place is imported instead)" 60 "$log" \
      env PYTHONPATH="$ROOT" "$PY" -c 'import diffusion_ext; print(diffusion_ext.build_info())'
    return
  fi
  local arch="${TORCH_CUDA_ARCH_LIST:-$(device_arch)}"
  use_prebuilt "$arch" && return
  # in place, against this machine's torch: no pip, no venv, no download; ptxas -v for the resource table
  stage "build (sm ${arch}, $(nproc) jobs)" 300 "$log" env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    DIFFUSION_EXT_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace
  stage "CUDA kernel resources (ptxas -v)" 60 "$log" "$PY" scripts/cuda_resources.py "$log" \
    --arch "${arch/./}" --markdown "$OUT/1-cuda-resources.md"
}

# ---------------------------------------------------------------------------------------------------
# call 1: build, gpu tests, memcheck
# ---------------------------------------------------------------------------------------------------
call1() {
  start_summary "$OUT/1-summary.md" "GPU check, call 1: build, gpu-marked tests, compute-sanitizer memcheck"
  carried_wheels "$OUT/1-build.log"
  build "$OUT/1-build.log"
  export PYTHONPATH
  PYTHONPATH="$(python_path)"
  local tests_log="$OUT/1-tests.log"
  if [ "$DRY" = 1 ]; then
    stage "gpu-marked and fuzz tests (dry run: collected, not run)" 300 "$tests_log" \
      "$PY" -m pytest python_tests -m "gpu or fuzz" --collect-only -q -p no:cacheprovider
  else
    local sel=(-m "gpu or fuzz")
    [ -n "${GPU_TESTS:-}" ] && eval "sel=($GPU_TESTS)"  # several pytest arguments, quoted as in a shell
    stage "gpu-marked and fuzz tests" 180 "$tests_log" "$PY" -m pytest python_tests "${sel[@]}" -q -p no:cacheprovider \
      -n "${WORKERS:-12}" --timeout 120
  fi
  local san_log="$OUT/1-sanitizer.log"
  if [ "$DRY" = 1 ]; then
    stage "cuda_smoke.py (dry run: CPU kernels, no sanitizer)" 300 "$san_log" "$PY" benchmarks/cuda_smoke.py cpu
  elif [ "${SKIP_SANITIZER:-0}" = 1 ]; then
    STAGES+=("compute-sanitizer: skipped (SKIP_SANITIZER=1)")
  else
    stage "compute-sanitizer memcheck, every CUDA kernel once" 120 "$san_log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/cuda_smoke.py cuda
  fi
  # racecheck (shared-memory hazards: the attention and group-norm kernels' tiles) with the minutes a carried
  # build saved; it slows shared-memory kernels more than memcheck does, hence its own limit
  local race_log="$OUT/1-racecheck.log"
  if [ "$DRY" = 1 ]; then
    STAGES+=("compute-sanitizer racecheck: dry run, skipped")
  elif [ "$CARRIED" != 1 ] || [ "${SKIP_SANITIZER:-0}" = 1 ] || [ "${SKIP_RACECHECK:-0}" = 1 ]; then
    STAGES+=("compute-sanitizer racecheck: skipped (built here, or SKIP_SANITIZER / SKIP_RACECHECK)")
  else
    stage "compute-sanitizer racecheck, every CUDA kernel once" 120 "$race_log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" benchmarks/cuda_smoke.py cuda
  fi
  stages_section
  note ""
  note "## Tests"
  note '```'
  grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed|errors?|skipped|deselected|tests? collected)' "$tests_log" | tail -n 40 | tee -a "$SUMMARY" >&2
  note '```'
  note ""
  note "## Memcheck"
  note '```'
  grep -E 'ERROR SUMMARY|^FAIL|cuda_smoke:' "$san_log" | tail -n 20 | tee -a "$SUMMARY" >&2
  note '```'
  if [ -s "$race_log" ]; then
    note ""
    note "## Racecheck"
    note '```'
    grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|^FAIL|cuda_smoke:' "$race_log" | tail -n 20 | tee -a "$SUMMARY" >&2
    note '```'
  fi
  if [ -s "$OUT/1-cuda-resources.md" ]; then
    note ""
    note "## CUDA kernel resources: see 1-cuda-resources.md ($(grep -c '^| `' "$OUT/1-cuda-resources.md") kernels)"
  fi
}

# ---------------------------------------------------------------------------------------------------
# call 2: benchmarks
# ---------------------------------------------------------------------------------------------------
skipped() { [[ " ${SKIP:-} " == *" $1 "* ]]; }

call2() {
  start_summary "$OUT/2-summary.md" "GPU check, call 2: benchmarks"
  local log="$OUT/2-bench.log" dev="cuda" mode="--quick"
  if [ "$DRY" = 1 ]; then dev="cpu"; mode="--smoke"; fi
  carried_wheels "$log"
  if [ "$DRY" = 0 ] && ! extension_has_cuda; then
    note "- the extension with CUDA is not built here (a fresh machine): building again"
    build "$log"
  fi
  export PYTHONPATH
  PYTHONPATH="$(python_path)"
  local shapes="256x4x128x128" dtypes="bfloat16"
  [ "$DRY" = 1 ] && shapes="2x3x8x8" && dtypes="float32"
  skipped schedule || stage "schedule ops" 120 "$log" "$PY" -m diffusion_ext bench --device "$dev" \
    --shapes "$shapes" --dtypes "$dtypes" --providers eager,"$([ "$DRY" = 1 ] && echo cpu || echo cuda,triton)" \
    $([ "$DRY" = 1 ] && echo --quick) --markdown "$OUT/2-schedule.md"
  bench_md() {  # NAME TITLE SCRIPT ARGS...: the script's table into $OUT/2-NAME.md
    local name=$1 title=$2; shift 2
    skipped "$name" && { STAGES+=("$name: skipped (SKIP)"); return; }
    { echo "## $title"; echo; } > "$OUT/2-$name.md"
    stage "$title" "${LIMIT:-180}" "$log" bash -c '"$@" >> "$0"' "$OUT/2-$name.md" "$PY" "$@"
  }
  LIMIT=120 bench_md gn "group_norm_act SiLU: eager, compile, cuda, triton" benchmarks/bench_group_norm_act.py "$dev" "$mode"
  LIMIT=150 bench_md attention "attention: eager, compile, SDPA backends, cuda, triton" benchmarks/bench_attention.py "$dev" "$mode"
  # shellcheck disable=SC2086
  LIMIT=240 bench_md unet "UNet train and sampling step" benchmarks/bench_unet.py "$dev" "$mode" ${UNET_ARGS:-}
  LIMIT=150 bench_md sampling "DDPM sampling loop, CUDA graph" benchmarks/bench_sampling_loop.py "$dev" "$mode"
  local dargs=(--reps 3 --no-compile)
  [ "$DRY" = 1 ] && dargs=(--quick --no-compile --precisions fp32)  # bf16 is emulated on CPUs without it
  [ -n "${DIFFUSERS_ARGS:-}" ] && eval "dargs=($DIFFUSERS_ARGS)"
  LIMIT=240 bench_md diffusers "diffusers UNet2DModel: patched vs unpatched" benchmarks/bench_diffusers.py "$dev" \
    "${dargs[@]}"
  # the scheduler steps' table goes into the same file (a call brings back at most 8)
  skipped diffusers || stage "diffusers scheduler steps" 90 "$log" bash -c \
    '{ echo; echo "## diffusers scheduler steps: patched vs unpatched"; echo; "$@"; } >> "$0"' "$OUT/2-diffusers.md" \
    "$PY" benchmarks/bench_diffusers_schedulers.py "$dev" --reps 5 $([ "$DRY" = 1 ] && echo --quick)
  stages_section
}

# ---------------------------------------------------------------------------------------------------
# assemble: the results file from what the two calls brought back
# ---------------------------------------------------------------------------------------------------
assemble() {  # DIR1 DIR2 [RESULT]
  local d1=$1 d2=$2 result=${3:-}
  local gpu
  gpu="$(sed -nE 's/^- device: ([^,]+),.*/\1/p' "$d1/1-summary.md" "$d2/2-summary.md" 2>/dev/null | head -n 1)"
  local slug
  slug="$(printf '%s' "${gpu:-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')"
  result="${result:-$ROOT/benchmarks/results/${slug:-gpu}-$(date +%Y-%m-%d).md}"
  {
    echo "# diffusion_ext on ${gpu:-a GPU}: tests, memcheck and benchmarks"
    echo
    echo "Assembled by \`bash benchmarks/gpu_check.sh assemble\` from the two device calls of benchmarks/gpu_check.sh;"
    echo "every number below comes from those runs."
    echo
    for f in "$d1/1-summary.md" "$d2/2-summary.md"; do
      [ -f "$f" ] && { sed -e '1s/^# /## /' -e '2,$s/^## /### /' "$f"; echo; }
    done
    for f in "$d1/1-cuda-resources.md" "$d2"/2-schedule.md "$d2"/2-gn.md "$d2"/2-attention.md "$d2"/2-unet.md \
             "$d2"/2-sampling.md "$d2"/2-diffusers.md; do
      [ -f "$f" ] && { sed -e 's/^# /## /' "$f"; echo; }
    done
  } > "$result"
  echo "wrote $result" >&2
}

check_out_files() {  # at most 8 files come back from a call
  local n
  n=$(find "$OUT" -maxdepth 1 -type f -name "$1-*" | wc -l)
  if [ "$n" -gt 8 ]; then echo "gpu_check.sh: $n files in $OUT for call $1: more than the 8 a lease returns" >&2; return 1; fi
}

case "$WHAT" in
  call1|call2|all)
    mkdir -p "$OUT"
    if [ "$DRY" = 0 ] && ! command -v nvidia-smi > /dev/null; then
      echo "gpu_check.sh: nvidia-smi not found: this needs an NVIDIA GPU (or --dry-run)" >&2; exit 2
    fi
    rc=0
    if [ "$WHAT" != call2 ]; then call1; check_out_files 1 || rc=1; fi
    if [ "$WHAT" != call1 ]; then call2; check_out_files 2 || rc=1; fi
    if [ "$WHAT" = all ]; then assemble "$OUT" "$OUT" "$OUT/results.md"; fi
    # a dry run fails on any failed stage (it is CI's check of this script); a real call reports them
    if [ "$DRY" = 1 ] && grep -h -E ': (FAILED|STOPPED)' "$OUT"/[12]-summary.md > /dev/null 2>&1; then rc=1; fi
    exit $rc
    ;;
  assemble) assemble "$2" "${3:?usage: assemble DIR1 DIR2}" ;;
  prebuilt-key) prebuilt_key "$2" ;;  # gpu_prebuild.sh: ARCH
  *) usage ;;
esac
