#!/usr/bin/env bash
# Every benchmark with a CUDA path, in under 10 minutes on one H100/H200, into one Markdown results file.
# The first thing to run on a lent GPU machine (see the README):
#
#   benchmarks/gpu_suite.sh [RESULTS.md]              # default benchmarks/gpu_suite_results.md
#   benchmarks/gpu_suite.sh --cpu-quick [RESULTS.md]  # each benchmark's smallest CPU path: checks the suite runs
#
# Benchmarks (each one bounded by its own time cap and by what is left of the suite's TOTAL_S, default 570 s):
#   lora_overhead   per-sample bmm LoRA vs no adapter vs peft, Llama-3.1-8B shape, bf16 (2 timed repeats)
#   episodes        lock-step vs one-at-a-time MMLU episodes, SmolLM2-135M (offline pack), 8 problems x 2 rounds
#   logprob_memory  peak memory of adapter_grads / router scoring, 128k vocabulary: before vs after the log-prob
#                   helper when this is a git checkout holding the "before" commit, else the current code alone
#   serve_load      the Serve app (demo config, offline packs) under 1 / 4 / 16 concurrent clients
# A benchmark that fails, times out or lacks what it needs is recorded as such and the suite goes on; the exit
# status is 1 when any benchmark failed or timed out, else 0. PYTHON picks the interpreter (default: .venv/bin/python
# when present, else python3).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
MODE=gpu
if [[ "${1:-}" == "--cpu-quick" ]]; then
  MODE=cpu
  shift
fi
RESULTS="${1:-benchmarks/gpu_suite_results.md}"
# the GPU run must fit 10 minutes; the CPU quick check only proves every path runs (a shared CPU box is slow)
if [[ "$MODE" == gpu ]]; then TOTAL_S="${TOTAL_S:-570}"; else TOTAL_S="${TOTAL_S:-1800}"; fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BEFORE_REF=4767535  # benchmarks/logprob_memory.py's BEFORE_REF: the last commit with full-vocabulary log-softmax
STARTED=$(date +%s)
FAILED=0
LOG="$(mktemp -d)"
trap 'rm -rf "$LOG"' EXIT

if [[ "$MODE" == gpu ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to $PYTHON: run with --cpu-quick on a CPU machine" >&2
  exit 2
fi

mkdir -p "$(dirname "$RESULTS")"
{
  echo "# GPU benchmark suite ($MODE mode)"
  echo
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname): $(nproc) CPU cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}'),"
  "$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  echo
  if command -v nvidia-smi >/dev/null; then
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo '```'
    echo
  fi
} >"$RESULTS"

# run NAME CAP_S COMMAND...: run under the smaller of CAP_S and the time left, and record it in $RESULTS
run() {
  local name="$1" cap="$2"
  shift 2
  local left=$((TOTAL_S - ($(date +%s) - STARTED)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    skip "$name" "no time left in the suite's ${TOTAL_S} s"
    return
  fi
  echo "== $name (at most ${limit} s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOG/$name.out" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) status
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT after ${limit} s"; FAILED=1 ;;
    *) status="FAILED (exit status $rc)"; FAILED=1 ;;
  esac
  echo "   $status, ${took} s"
  {
    echo "## $name: $status, ${took} s"
    echo
    echo "\`$*\`"
    echo
    echo '```'
    tail -n 60 "$LOG/$name.out"
    echo '```'
    echo
  } >>"$RESULTS"
}

skip() {
  echo "== $1: skipped ($2)"
  printf '## %s: skipped\n\n%s\n\n' "$1" "$2" >>"$RESULTS"
}

has_smollm2() {
  "$PYTHON" - <<'EOF' >/dev/null 2>&1
from haps_ray import packs
packs.pack_tokenizer_dir(packs.PACKS["smollm2-135m-instruct"], packs.cache_root())
EOF
}

# ---- lora_overhead
if [[ "$MODE" == gpu ]]; then
  run lora_overhead 300 "$PYTHON" benchmarks/lora_overhead.py --preset llama8b --repeats 2 --warmup 1 --switch-requests 4
else
  run lora_overhead 400 "$PYTHON" benchmarks/lora_overhead.py --preset tiny --device cpu --repeats 1 --warmup 0 \
    --switch-requests 2
fi

# ---- episodes (needs the SmolLM2 offline pack)
if ! has_smollm2; then
  skip episodes "the SmolLM2-135M-Instruct offline pack is not installed here (scripts/install.sh installs it)"
elif [[ "$MODE" == gpu ]]; then
  run episodes 150 "$PYTHON" -m benchmarks.episodes --device cuda --n 8 --rounds 2 --max-new-tokens 64
else
  run episodes 400 "$PYTHON" -m benchmarks.episodes --device cpu --n 2 --rounds 1 --max-new-tokens 8 --threads 2
fi

# ---- logprob_memory: before vs after needs the before commit in git; otherwise the current code's peaks alone
device=cuda
[[ "$MODE" == cpu ]] && device=cpu
if [[ "$MODE" == gpu ]] && git rev-parse --verify --quiet "${BEFORE_REF}^{commit}" >/dev/null 2>&1; then
  run logprob_memory 120 "$PYTHON" -m benchmarks.logprob_memory --device cuda
else
  # the CPU "before" path peaks at ~16 GB: the quick check measures the current code only
  why="current code only: $([[ "$MODE" == cpu ]] && echo "the CPU quick path skips the ~16 GB 'before' run" \
    || echo "commit $BEFORE_REF is not in a git checkout here")"
  echo "   logprob_memory: $why"
  printf '%s\n\n' "logprob_memory: $why" >>"$RESULTS"
  size=()
  [[ "$MODE" == cpu ]] && size=(--batch 4 --completion 32)  # a quick check, not the measurement
  run logprob_memory_adapter_grads 300 "$PYTHON" -m benchmarks.logprob_memory --worker adapter_grads --device "$device" \
    --out "$LOG/adapter_grads.pt" "${size[@]}"
  run logprob_memory_router 300 "$PYTHON" -m benchmarks.logprob_memory --worker router --device "$device" \
    --out "$LOG/router.pt" "${size[@]}"
fi

# ---- serve_load: app start-up + warm-up + 3 levels x --duration must fit the cap
if [[ "$MODE" == gpu ]]; then
  run serve_load 150 "$PYTHON" -m benchmarks.serve_load --device cuda --duration 10
else
  run serve_load 400 "$PYTHON" -m benchmarks.serve_load --device cpu --duration 3 --clients 1,4
fi

echo "suite: $(($(date +%s) - STARTED)) s in all; results in $RESULTS"
printf '%s\n' "Suite wall time: $(($(date +%s) - STARTED)) s (limit ${TOTAL_S} s)." >>"$RESULTS"
exit $FAILED
