#!/usr/bin/env bash
# Issue 26, item 3: the perf grid's retrieval (BLIP-2 ITM ViT-g, random bf16 weights) at the
# paper's protocol, Flickr30k-1K-sized (1,000 images, 5,000 captions, k_test 128), through pytest
# as a user runs it. Prints each config's wall, phase seconds (JUnit eval.seconds_*), ITM pairs/s.
#   OUT=DIR SELECT='fp16 or rtn-w4g128-vision' bash benchmarks/perf/retrieval_grid.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-perf-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
SELECT=${SELECT:-fp16 or rtn-w4g128-vision}
REPORTS=$(mktemp -d); CACHE=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/retrieval-grid.txt"
$PY -c "from pathlib import Path; from fixtures.world.generate import ensure_world; ensure_world(Path('$CACHE/world'))"
t0=$SECONDS
$PY -m pytest --grid=benchmarks/grids/perf.yaml --device cuda -k "blip2-itm-coco-random and ($SELECT)" \
  --cache-dir="$CACHE" --report-dir="$REPORTS" -p no:randomly 2>&1 | tail -15
echo "pytest wall: $((SECONDS - t0)) s" | tee -a "$OUT/retrieval-grid.txt"
cp "$REPORTS/results.csv" "$OUT/retrieval-results.csv"; cp "$REPORTS/junit.xml" "$OUT/retrieval-junit.xml"
$PY - "$REPORTS/junit.xml" "$REPORTS/results.csv" <<'PYEOF' | tee -a "$OUT/retrieval-grid.txt"
import csv, sys, xml.etree.ElementTree as ET
peak = {row["test_id"].split("[")[-1].rstrip("]"): row["peak_mem_mb"] for row in csv.DictReader(open(sys.argv[2]))}
print("| config | status | eval s | image side s | ITC s | ITM pairs s | ITM pairs | pairs/s | quant s | peak MB | r_mean |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for case in ET.parse(sys.argv[1]).iter("testcase"):
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    status = "failed" if case.find("failure") is not None or case.find("error") is not None else \
             "skipped" if case.find("skipped") is not None else "passed"
    get = lambda k: props.get(k, "")
    pairs, itm = get("eval.itm_pairs"), get("eval.seconds_itm_pairs")
    rate = f"{float(pairs) / float(itm):,.0f}" if pairs and itm else ""
    print(f"| {case.get('name').split('[')[-1].rstrip(']')} | {status} | {get('eval_seconds')} | "
          f"{get('eval.seconds_image_side')} | {get('eval.seconds_itc')} | {itm} | {pairs} | {rate} | "
          f"{get('quant_seconds')} | {peak.get(case.get('name').split('[')[-1].rstrip(']'), '')} | {get('metric.r_mean')} |")
PYEOF
