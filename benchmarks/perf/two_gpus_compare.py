"""The 1-GPU and 2-GPU runs of benchmarks/perf/two_gpus.sh side by side: wall clock and ratio,
each worker's device and its share of the work (from the CSV's worker, device, quant_seconds
and eval_seconds columns), and whether every metric value is identical.

    python benchmarks/perf/two_gpus_compare.py ONE.csv TWO.csv   # each beside its NAME.seconds
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from reports.compare import same_values
from reports.csv_log import read_rows

GOAL = 1.8


def per_worker(rows: list[dict[str, str]]) -> dict[tuple[str, str], tuple[int, float]]:
    """(worker, device) -> (tests, summed quantization + evaluation seconds)."""
    tests: dict[tuple[str, str], set[str]] = defaultdict(set)
    seconds: dict[tuple[str, str], float] = defaultdict(float)
    for row in rows:
        key = (row["worker"], row["device"])
        if row["test_id"] in tests[key]:
            continue   # one row per metric: count each test's seconds once
        tests[key].add(row["test_id"])
        seconds[key] += float(row["quant_seconds"] or 0) + float(row["eval_seconds"] or 0)
    return {key: (len(tests[key]), seconds[key]) for key in tests}


def main(one_csv: str, two_csv: str) -> int:
    runs = {"1 GPU": Path(one_csv), "2 GPUs": Path(two_csv)}
    rows = {name: read_rows(path) for name, path in runs.items()}
    walls = {name: float(path.with_suffix(".seconds").read_text()) for name, path in runs.items()}
    print("| run | wall s | worker | device | tests | quant + eval s |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        for (worker, device), (count, seconds) in sorted(per_worker(rows[name]).items()):
            print(f"| {name} | {walls[name]:.1f} | {worker} | {device} | {count} | {seconds:.1f} |")
    ratio = walls["1 GPU"] / walls["2 GPUs"]
    print(f"\nratio 1 GPU / 2 GPUs: {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'missed'})")
    report, identical = same_values(rows["1 GPU"], rows["2 GPUs"])
    print(report)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
