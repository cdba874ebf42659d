#!/usr/bin/env bash
# CPU results: run the schedule-op benchmark on the CPU in the current environment (the python on PATH,
# with diffusion_ext installed) and write benchmarks/results/cpu-<YYYY-MM-DD>.md with the CPU model, the
# core count, the versions and the table. Every number in that file comes from this run.
#
#   bash benchmarks/cpu_results.sh [extra bench options, e.g. --compile]
#
# Environment: PYTHON (default: python). Run it on an otherwise idle machine: the table records the load
# average before the run, and says so when the machine was busy.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"

DATE="$(date +%Y-%m-%d)"
RESULTS_DIR="$ROOT/benchmarks/results"
RESULT="$RESULTS_DIR/cpu-$DATE.md"
mkdir -p "$RESULTS_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

MODEL="$(lscpu | sed -nE 's/^Model name:[[:space:]]*//p' | head -n 1)"
SOCKETS="$(lscpu | sed -nE 's/^Socket\(s\):[[:space:]]*//p' | head -n 1)"
CORES_PER_SOCKET="$(lscpu | sed -nE 's/^Core\(s\) per socket:[[:space:]]*//p' | head -n 1)"
THREADS_PER_CORE="$(lscpu | sed -nE 's/^Thread\(s\) per core:[[:space:]]*//p' | head -n 1)"
LOGICAL="$(nproc)"
VERSIONS="$("$PY" - <<'PY'
import platform, torch, diffusion_ext
print(f"- torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")
print(f"- diffusion_ext.build_info(): {diffusion_ext.build_info()}")
PY
)"

"$PY" -m diffusion_ext bench --device cpu --markdown "$TMP/bench.md" "$@"

COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null || true)" ]; then COMMIT="$COMMIT (with local changes)"; fi
{
  echo "# diffusion_ext CPU results: $MODEL, $DATE"
  echo
  echo "Written by \`benchmarks/cpu_results.sh\` at commit $COMMIT."
  echo
  echo "## Machine"
  echo
  echo "- CPU: $MODEL"
  echo "- cores: $LOGICAL logical CPUs available (lscpu: ${SOCKETS:-?} socket(s) × ${CORES_PER_SOCKET:-?} core(s) × ${THREADS_PER_CORE:-?} thread(s))"
  echo "$VERSIONS"
  echo
  echo "## Benchmark: \`python -m diffusion_ext bench --device cpu $*\`"
  echo
  sed -e '1{/^# /d}' "$TMP/bench.md"
} > "$RESULT"
echo "wrote $RESULT" >&2
