#!/usr/bin/env bash
# The suite on GPUs, timed: the default grid on one GPU, the same grid spread over every visible
# GPU by pytest-xdist (each run quantizing from scratch), a check that both give the same metrics,
# then the methods grid (GPTQ/AWQ calibration) over every GPU. Results: benchmarks/perf/RESULTS.md.
#
#   bash benchmarks/perf/gpu_grid.sh            # on a machine with the suite's dependencies
#   OUT=DIR SELECT='w4 and not coco_caption' METHODS=0 STEP_LIMIT=300 bash benchmarks/perf/gpu_grid.sh
#
# Wheels under $WHEELS (default .whl/, for a machine without a package index) are installed to
# /tmp/site first. COCO captioning is left out only where no `java` is found: its metrics need it.
set -uo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-perf-out}          # logs, times and each run's results.csv
REPORTS=${REPORTS:-$(mktemp -d)}  # each run's whole report dir
METHODS=${METHODS:-1}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}         # cpu: try the script itself on a machine without a GPU
STEP_LIMIT=${STEP_LIMIT:-3600} # seconds per timed run; rc 124 = cut off
EXTRA=${EXTRA:-}               # more pytest options for every run, e.g. --limit 100
mkdir -p "$OUT"

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
NO_COCO=""
command -v java >/dev/null || { NO_COCO="not coco_caption"; echo "no java: COCO captioning left out"; }
SELECT=${SELECT:-w4${NO_COCO:+ and $NO_COCO}}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
WORKERS=${WORKERS:-$(( NGPU > 1 ? NGPU : 2 ))}  # xdist workers: one per GPU, two on one GPU
if [ "$DEVICE" = cuda ]; then
  [ "$NGPU" -ge 1 ] || { echo "gpu_grid.sh: no CUDA device visible" >&2; exit 1; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/times.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/times.txt"

CACHE=$(mktemp -d)
seconds() { local t0=$SECONDS; timeout "$STEP_LIMIT" "$@" > "$OUT/$LOG.log" 2>&1; local rc=$?; echo "$LOG: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"; tail -3 "$OUT/$LOG.log"; }

# The world is generated once, outside the timed runs.
LOG=world seconds $PY -c "from pathlib import Path; from fixtures.world.generate import ensure_world; ensure_world(Path('$CACHE/world'))"
# Every run starts from an empty quantized-model cache, so each one quantizes.
LOG=serial seconds $PY -m pytest -m "$SELECT" --device "$DEVICE" $EXTRA --cache-dir="$CACHE" --report-dir="$REPORTS/serial"
rm -rf "$CACHE/quantized"
LOG=xdist seconds $PY -m pytest -m "$SELECT" -n "$WORKERS" --device "$DEVICE" $EXTRA --cache-dir="$CACHE" --report-dir="$REPORTS/xdist"
cp "$REPORTS/serial/results.csv" "$OUT/serial.csv"; cp "$REPORTS/xdist/results.csv" "$OUT/xdist.csv"
$PY - "$OUT" <<'EOF' | tee -a "$OUT/times.txt"
import sys
from collections import Counter
from reports.csv_log import read_rows
out = sys.argv[1]
rows = {name: read_rows(f"{out}/{name}.csv") for name in ("serial", "xdist")}
values = {name: {(r["test_id"], r["metric"]): r["value"] for r in rs} for name, rs in rows.items()}
same = sum(values["serial"][k] == v for k, v in values["xdist"].items() if k in values["serial"])
print(f"xdist vs serial: {same} of {len(values['serial'])} metric values identical")
print("xdist devices:", dict(Counter((r["worker"], r["device"]) for r in rows["xdist"])))
EOF
if [ "$METHODS" = 1 ]; then
  rm -rf "$CACHE/quantized"
  LOG=methods seconds $PY -m pytest --grid=benchmarks/grids/methods.yaml ${NO_COCO:+-m "$NO_COCO"} -n "$WORKERS" \
    --device "$DEVICE" $EXTRA --cache-dir="$CACHE" --report-dir="$REPORTS/methods"
  cp "$REPORTS/methods/results.csv" "$OUT/methods.csv"
fi
rm -rf "$CACHE"
cat "$OUT/times.txt"
echo "whole report dirs (junit.xml, samples/, plots/): $REPORTS"
