#!/usr/bin/env bash
# Issue 13: the perf grid (benchmarks/grids/perf.yaml: LLaVA-1.5-7B architecture, random bf16
# weights, VQAv2-style samples) with one xdist worker on one GPU and with two workers on two
# GPUs, each from an empty quantized-model cache; then the wall-clock ratio, the device each
# worker used (the CSV's worker and device columns) and a value-by-value comparison.
#
#   bash benchmarks/perf/two_gpus.sh                      # both runs, on a host with two GPUs
#   PART=one OUT=DIR bash benchmarks/perf/two_gpus.sh     # only the 1-GPU run (DIR/one.csv)
#   PART=two ONE=DIR/one.csv bash benchmarks/perf/two_gpus.sh   # the 2-GPU run, compared to it
#
# The selection leaves out GPTQ and AWQ of the whole model (-all), which would push the 1-GPU
# run past the device tool's 10-minute limit per command: 8 configs remain (FP, RTN x 3
# components, GPTQ and AWQ of the language model and of the vision tower).
set -uo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-perf-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
PART=${PART:-both}
SELECT=${SELECT:-not gptq-w4g128-all and not awq-w4g128-all}
EXTRA=${EXTRA:-}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee -a "$OUT/times.txt"
$PY -c "import torch, transformers, xdist; print('torch', torch.__version__, 'transformers', transformers.__version__, 'xdist', xdist.__version__)" | tee -a "$OUT/times.txt"

CACHE=${CACHE:-$(mktemp -d)}
REPORTS=$(mktemp -d)
$PY -c "from pathlib import Path; from fixtures.world.generate import ensure_world; ensure_world(Path('$CACHE/world'))" || exit 1

timed() {   # timed NAME GPUS... : the grid on those GPUs, one worker each, from an empty cache
  local name=$1; shift
  local gpus; gpus=$(IFS=,; echo "$*")
  rm -rf "$CACHE/quantized"
  local t0; t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=$gpus $PY -m pytest --grid=benchmarks/grids/perf.yaml -k "$SELECT" -n $# --device cuda \
    --cache-dir="$CACHE" --report-dir="$REPORTS/$name" $EXTRA > "$OUT/$name.log" 2>&1
  local rc=$?
  local wall; wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  echo "$name: GPUs $gpus, $# worker(s), rc $rc, wall $wall s" | tee -a "$OUT/times.txt"
  tail -4 "$OUT/$name.log"
  cp "$REPORTS/$name/results.csv" "$OUT/$name.csv" 2>/dev/null
  echo "$wall" > "$OUT/$name.seconds"
}

case "$PART" in one|both) timed one 0 ;; esac
case "$PART" in two|both) timed two 0 1 ;; esac
ONE=${ONE:-$OUT/one.csv}
if [ "$PART" != one ] && [ -f "$ONE" ]; then
  PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} $PY benchmarks/perf/two_gpus_compare.py "$ONE" "$OUT/two.csv" | tee -a "$OUT/times.txt"
fi
rm -rf "$CACHE" "$REPORTS"
