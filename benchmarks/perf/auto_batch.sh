#!/usr/bin/env bash
# The perf grid on one GPU with no batch size given (the runtime picks one from free memory,
# fixtures/runtime/batching.py), LLaVA's image-prefix sharing on as in the grid: FP and RTN W4 g128 of the
# language model for each random-init model of benchmarks/grids/perf.yaml. Prints the batch size
# chosen per (model, task) and the CSV's timings; runs the CUDA test of the batch-size probe.
#   OUT=DIR bash benchmarks/perf/auto_batch.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-perf-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then   # pytest-xdist for the GPU machine (see two_gpus.sh)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
GRID=$(mktemp --suffix .yaml)
sed -e 's/defaults: {limit: 300, batch_size: 64}/defaults: {limit: 300}/' benchmarks/grids/perf.yaml > "$GRID"
grep -n "defaults\|share_image_prefix" "$GRID"
$PY -m pytest tests/test_batching.py -q -p no:cacheprovider 2>&1 | tail -2
REPORT=$(mktemp -d)
$PY -m pytest --grid="$GRID" -k "fp16 or rtn-w4g128-language" --device cuda --report-dir="$REPORT" \
  -p no:cacheprovider 2>&1 | tail -15
for f in "$REPORT"/baselines/*.json; do
  $PY -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/', 1)[1], 'batch_size', d.get('batch_size'), 'n', d['n_samples'])" "$f"
done
$PY - "$REPORT/results.csv" <<'PY' | tee "$OUT/auto-batch.txt"
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    if row["primary"] == "true":
        print(row["model"], row["task"], row["config"], row["status"], "n", row["n_samples"],
              "eval_s", row["eval_seconds"], "quant_s", row["quant_seconds"], "peak_mb", row["peak_mem_mb"])
PY
cp "$REPORT/results.csv" "$OUT/auto-batch.csv"
