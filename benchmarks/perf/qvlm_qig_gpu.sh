#!/usr/bin/env bash
# Issues 18 and 19 on one GPU machine in one call: the Q-VLM tables (benchmarks/results/qvlm.sh)
# and the QIG grid on its CPU cores (the tiny models gain nothing from a GPU: RESULTS.md), while
# the GPU measures QIG's cost and Q-VLM's at full size (full_size.sh PART=qig).
#   VQB_COMMIT=<commit> OUT=DIR bash benchmarks/perf/qvlm_qig_gpu.sh
# Wheels under .whl/ (pytest-xdist and what the machine lacks) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-perf-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
WORKERS=${WORKERS:-5}
# The GPU part in the background: full-size QIG slices and Q-VLM W4A4 (official quantizers).
(PART=qig OUT="$OUT" PYTHON=$PY bash benchmarks/perf/full_size.sh > "$OUT/full-size.log" 2>&1) &
gpu=$!
# The embedded world once, then the two CPU jobs side by side, WORKERS xdist workers each.
$PY -c "from pathlib import Path; from fixtures.world.generate import ensure_world; ensure_world(Path('.cache/world'))"
t0=$SECONDS
(OUT=/tmp/qvlm-runs PY=$PY PYTEST_ARGS="-n $WORKERS --device cpu -q" bash benchmarks/results/qvlm.sh > "$OUT/tables.log" 2>&1
 echo "qvlm tables: rc $?, $((SECONDS - t0)) s" | tee -a /tmp/times.txt
 cp benchmarks/results/qvlm.md benchmarks/results/qvlm.csv benchmarks/results/qvlm-tensor.csv "$OUT/") &
tables=$!
$PY -m pytest --grid=benchmarks/grids/qig.yaml --report-dir=/tmp/qig-run -n "$WORKERS" --device cpu -q \
  > /tmp/qig.log 2>&1
echo "qig grid: rc $?, $((SECONDS - t0)) s" | tee -a /tmp/times.txt
cp /tmp/qig-run/results.csv "$OUT/qig.csv"
wait $tables
wait $gpu
echo "full size: rc $?" | tee -a /tmp/times.txt
tail -20 "$OUT/full-size.log"
tail -3 /tmp/qig.log; cat /tmp/times.txt
