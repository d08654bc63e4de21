#!/usr/bin/env bash
# Issue 23's measurements on one GPU, in the steps a device call can hold (10 minutes each):
#   bash benchmarks/perf/issue23_gpu.sh probe      # compiled_eval_probe.py, cache_write.py, the CUDA tests
#   bash benchmarks/perf/issue23_gpu.sh tests      # the CUDA tests alone (probe with TESTS=0 skips them)
#   bash benchmarks/perf/issue23_gpu.sh grid-new   # the LLaVA part of the perf grid, cold then warm cache
#   bash benchmarks/perf/issue23_gpu.sh grid-old   # the same grid from old-tree/ (`git archive cc055f1`)
#   bash benchmarks/perf/issue23_gpu.sh rotary     # rotary_probe.py: the compiled rotary kernel's forms
#   PACK=DIR bash benchmarks/perf/issue23_gpu.sh session   # what one call can hold (about 8 minutes
#        on an H100): probe (no key/value write forms), grid-new cold, tests, rotary; after each
#        step everything under $OUT is packed into DIR/<step>.tgz, so a call cut short keeps
#        the steps it finished
# Everything lands under $OUT (default perf-out). Wheels under .whl/ are installed to /tmp/site first
# (the device machine has torch and transformers but not the suite's other dependencies).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-perf-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -z "${WHEELS_IN:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then   # once per session's steps
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site WHEELS_IN=1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/device.txt"
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
SELECT="llava and not awq-w4g128-all"

now() { python3 -c "import time; print(time.time())"; }   # the machine has no bc
since() { python3 -c "import time; print('%.1f' % (time.time() - $1))"; }

# One grid run, its wall seconds from the shell, then its phase table.
grid() {  # grid NAME CACHE_DIR [tree]
  local name=$1 cache=$2 tree=${3:-.}
  local start; start=$(now)
  # Cold: a new inductor cache too (the probe's compiles stay on the machine between calls).
  (cd "$tree" && TORCHINDUCTOR_CACHE_DIR=${INDUCTOR_CACHE:-$(mktemp -d)} python3 -m pytest --grid=benchmarks/grids/perf.yaml -k "$SELECT" --device cuda \
      --report-dir "$OUT/$name" --cache-dir="$cache" -p no:cacheprovider -q) > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc, wall $(since "$start") s" | tee -a "$OUT/walls.txt"
  tail -3 "$OUT/$name.log"
  python3 benchmarks/perf/phase_table.py "$OUT/$name/junit.xml" | tee "$OUT/$name-phases.txt"
}

case "${1:-}" in
  probe)
    # IMPORTTIME=1: what imports take, and the collection alone, timed (Python start and collection:
    # 25.9 s before pytest's clock on an H200; imports 20 s of a 23.6 s --collect-only on an H100).
    if [ "${IMPORTTIME:-0}" = 1 ]; then
      start=$(now)
      python3 -X importtime -m pytest --grid=benchmarks/grids/perf.yaml -k "$SELECT" --collect-only -q \
        -p no:cacheprovider > /dev/null 2> "$OUT/importtime.txt"
      echo "collect-only: $(since "$start") s" | tee -a "$OUT/walls.txt"
      sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -8
    fi
    # Shared: 448 of the probe world's 529 questions about 120 images (one warm-up batch, six timed).
    python3 benchmarks/perf/compiled_eval_probe.py --batch 64 --batches 6 --distinct-batches 4 \
      --variants "${VARIANTS:-suite_shared,suite_shared_fused,suite_shared_fused_graphs,suite_distinct,suite_distinct_fused,suite_distinct_fused_graphs,task_shared,task_distinct}" \
      --profile "${PROFILE:-suite_shared_fused_graphs,suite_distinct_fused_graphs}" --profile-dir "$OUT" \
      2>&1 | grep -v Warning | tee "$OUT/probe-$COMMIT.log" | grep '^{'
    if [ "${CACHE_WRITE:-1}" = 1 ]; then   # the key/value write's forms (measured at f13055a)
      python3 benchmarks/perf/cache_write.py --layers 32 --device cuda --repeat 2 2>&1 | tee "$OUT/cache_write-$COMMIT.log" | tail -8
    fi
    if [ "${TESTS:-1}" = 1 ]; then bash "$0" tests; fi ;;
  tests)
    # The CUDA tests (skipped on a CPU): captured = eager decode, pinned inputs, a host entry on a GPU model.
    timeout 120 python3 -m pytest tests/test_vqav2.py tests/test_rtn.py tests/test_cache.py \
      -k "captured or pinned or gpu_model or fused or rounded" -q -p no:cacheprovider 2>&1 | tee "$OUT/tests-$COMMIT.log" | tail -4 ;;
  rotary)
    # The fused rotary kernel at 1.1 ms a prefill call where its bytes take about 0.4 ms: forms side by side.
    python3 benchmarks/perf/rotary_probe.py --code "$OUT/rotary-code" 2>&1 | grep -v Warning | tee "$OUT/rotary-$COMMIT.log" | grep '^{' ;;
  grid-new)
    rm -rf /tmp/cold-new /tmp/inductor-new
    INDUCTOR_CACHE=/tmp/inductor-new grid "grid-new-$COMMIT-cold" /tmp/cold-new
    # Warm: the quantized-model cache and the inductor cache the cold run left (a user's second run).
    if [ "${WARM:-1}" = 1 ]; then   # (an `&&` here made WARM=0 exit 1)
      INDUCTOR_CACHE=/tmp/inductor-new grid "grid-new-$COMMIT-warm" /tmp/cold-new
    fi ;;
  grid-old)
    rm -rf /tmp/cold-old
    grid grid-old-cc055f1 /tmp/cold-old old-tree ;;
  session)
    pack() { if [ -n "${PACK:-}" ]; then tar czf "$PACK/$1.tgz" -C "$OUT" .; fi; }
    CACHE_WRITE=0 TESTS=0 bash "$0" probe; pack a-probe
    WARM=0 bash "$0" grid-new; pack b-grid
    bash "$0" tests; bash "$0" rotary; pack c-rest ;;
  *) echo "usage: $0 probe|tests|grid-new|grid-old|rotary|session" >&2; exit 2 ;;
esac
