"""Where a run's wall time went, test by test, from its JUnit XML (issue 23 item 4).

Each testcase's wall (JUnit `time`: setup, call and teardown) beside what the suite recorded for
it: quant_seconds, eval_seconds and the runtime phases it paid for (`phase.*`: model build, FP
baseline, host snapshot, restore, calibration data, cache write...). "other" is what none of
them covers: the per-config overhead the issue asks to keep under 5 s. The FP row's evaluation
is the baseline's, already inside its `phase.fp_baseline`, so it is not counted twice; a
config's quant_seconds (on each of its rows) counts only in the first test of that model and
config, the one that quantized (the others reuse the model), and not where the config was read
from the quantized-model cache (shown in parentheses: the seconds of the run that built it). The
summary line gives the suite's wall and its part outside every testcase (collection, session
start, the final merge).

    python benchmarks/perf/phase_table.py REPORT_DIR/junit.xml
    # issue 23's LLaVA part of the perf grid (9 configs), on a GPU:
    pytest --grid=benchmarks/grids/perf.yaml -k "llava and not awq-w4g128-all" --device cuda --report-dir R
    python benchmarks/perf/phase_table.py R/junit.xml
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET


def rows(junit: str) -> tuple[list[dict], float]:
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    found, quantized = [], set()
    for case in suite.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        phases = {name.removeprefix("phase."): float(value)
                  for name, value in props.items() if name.startswith("phase.")}
        quant, evaluation = float(props.get("quant_seconds", 0)), float(props.get("eval_seconds", 0))
        is_fp = json.loads(props.get("config.method", '""')) == "fp"
        wall = float(case.get("time", 0))
        case_id = case.get("name").partition("[")[2]   # model-config: one quantization for all its tasks
        # A config read from the quantized-model cache (phase cache_read) reports the seconds of
        # the quantization that built the entry, which this run did not pay.
        paid = 0.0 if case_id in quantized or "cache_read" in phases else quant
        quantized.add(case_id)
        found.append({"test": case.get("name"), "wall": wall, "quant": quant if paid or not quant else f"({quant:.1f})",
                      "eval": evaluation, "phases": phases,
                      "other": wall - paid - (0.0 if is_fp else evaluation) - sum(phases.values())})
    return found, float(suite.get("time", 0))


def markdown(found: list[dict], suite_seconds: float) -> str:
    names = sorted({name for row in found for name in row["phases"]})
    head = ["test", "wall s", "quant s", "eval s", *[f"{name} s" for name in names], "other s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in found:
        cells = [row["test"], row["wall"], row["quant"], row["eval"], *[row["phases"].get(n, "") for n in names],
                 row["other"]]
        lines.append("| " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    tests = sum(row["wall"] for row in found)
    lines.append(f"\nsuite wall {suite_seconds:.1f} s; testcases {tests:.1f} s; "
                 f"outside them {suite_seconds - tests:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("junit", help="a run's junit.xml")
    args = parser.parse_args()
    print(markdown(*rows(args.junit)))


if __name__ == "__main__":
    main()
