"""One self-contained HTML page per run, for a person opening CI artifacts: run metadata, the
compare against a base run (when given), a table per (model, task), and every plot of
reports/plots.py as an embedded base64 PNG. Nothing outside the file is referenced, so the page
survives being downloaded alone."""
from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Sequence
from html import escape
from pathlib import Path

from reports.compare import (ADDED, IMPROVEMENT, NOT_COMPARABLE, REGRESSION, REMOVED, UNCHANGED, Comparison,
                             compare_runs)
from reports.compare_markdown import finding_cells
from reports.plots import make_figures, png_bytes
from reports.runs import Run, load_run
from reports.schema import is_primary, is_random_init, parse_float
from tasks.registry import TASKS, UnknownTask

REPORT_NAME = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1300px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
tr.REGRESSION td { background: #fdd; } tr.improvement td { background: #dfd; }
tr.not-comparable td { background: #eee; color: #555; }
.meta td:first-child { font-weight: bold; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 620px; }
figcaption { font-size: 0.85em; color: #555; }
.problems { color: #a40; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int] = frozenset(),
           row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{escape(header)}</th>" for header in headers)
    body = []
    for index, cells in enumerate(rows):
        css = f' class="{escape(row_classes[index])}"' if row_classes else ""
        tds = "".join(f'<td class="num">{escape(cell)}</td>' if i in numeric else f"<td>{escape(cell)}</td>"
                      for i, cell in enumerate(cells))
        body.append(f"<tr{css}>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _number(cell: object, signed: bool = False) -> str:
    number = parse_float(cell)
    if number is None:
        return "-"
    return f"{number:+.2f}" if signed else f"{number:.2f}"


def status_counts(rows: Sequence[dict[str, str]]) -> Counter:
    """How many tests passed, failed, errored or were skipped: each test's last recorded status."""
    last: dict[str, str] = {}
    for row in rows:
        last[row.get("test_id", "")] = row.get("status", "") or "unknown"
    return Counter(last.values())


def _distinct(rows: Sequence[dict[str, str]], column: str) -> str:
    return ", ".join(sorted({row.get(column) or "" for row in rows} - {""})) or "unknown"


def _metadata(run: Run) -> str:
    statuses = status_counts(run.rows)
    counts = ", ".join(f"{statuses.get(status, 0)} {status}" for status in ("passed", "failed", "error", "skipped"))
    extra = sorted(set(statuses) - {"passed", "failed", "error", "skipped"})
    counts += "".join(f", {statuses[status]} {status}" for status in extra)
    random = sum(is_random_init(row) for row in run.rows if is_primary(row))
    rows = [("source", str(run.source)), ("run id", _distinct(run.rows, "run_id")),
            ("commit", _distinct(run.rows, "commit")), ("device", _distinct(run.rows, "device")),
            ("tests", f"{sum(statuses.values())}: {counts}"),
            ("first / last test finished", f"{min(_timestamps(run.rows), default='-')} / "
                                           f"{max(_timestamps(run.rows), default='-')}"),
            ("weights", f"{random} primary rows on random-init weights: timings only, never accuracy"
             if random else "trained")]
    cells = "".join(f"<tr><td>{escape(name)}</td><td>{escape(value)}</td></tr>" for name, value in rows)
    return f'<table class="meta">{cells}</table>'


def _timestamps(rows: Sequence[dict[str, str]]) -> list[str]:
    return [row["timestamp"] for row in rows if row.get("timestamp")]


_TASK_HEADERS = ("config", "method", "components", "w_bits", "a_bits", "a_quant", "bpw", "metric", "value", "FP",
                 "delta", "rel. delta")
_TAIL_HEADERS = ("n", "status")


def _diagnostics(task: str) -> tuple[str, ...]:
    """The task's secondary metrics that say why its score moved (tasks.registry), shown beside it."""
    try:
        return TASKS.get(task).diagnostics
    except UnknownTask:
        return ()


def _task_tables(rows: Sequence[dict[str, str]]) -> str:
    """One table per (model, task): each test's primary metric (or its bare row if it never
    measured, so a failure stays visible), its diagnostics (format failures, answer length), by bpw."""
    chosen: dict[str, dict[str, str]] = {}
    values: dict[str, dict[str, str]] = {}
    for row in rows:
        test = row.get("test_id", "")
        values.setdefault(test, {})[row.get("metric", "")] = row.get("value", "")
        current = chosen.get(test)
        if current is None or is_primary(row) or not is_primary(current):
            chosen[test] = row
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in chosen.values():
        groups.setdefault((row.get("model", ""), row.get("task", "")), []).append(row)
    parts = []
    for (model, task), members in sorted(groups.items()):
        members.sort(key=lambda r: (-(parse_float(r.get("bpw")) or 0.0), r.get("config", "")))
        diagnostics = _diagnostics(task)
        cells = [(r.get("config", ""), r.get("method", ""), r.get("components", ""), r.get("w_bits", ""),
                  r.get("a_bits", ""), r.get("a_quant", "") or "-", _number(r.get("bpw")), r.get("metric", ""),
                  _number(r.get("value")), _number(r.get("fp_value")), _number(r.get("delta"), True),
                  "-" if parse_float(r.get("rel_delta")) is None else f"{100 * parse_float(r.get('rel_delta')):+.1f}%",
                  *(_number(values[r.get("test_id", "")].get(name)) for name in diagnostics),
                  r.get("n_samples", ""), r.get("status", "") + (" (random-init)" if is_random_init(r) else ""))
                 for r in members]
        headers = (*_TASK_HEADERS, *diagnostics, *_TAIL_HEADERS)
        numeric = {6, 8, 9, 10, 11, *range(12, 12 + len(diagnostics) + 1)}
        parts.append(f"<h3>{escape(model)} · {escape(task)}</h3>" + _table(headers, cells, numeric=numeric))
    return "".join(parts)


_COMPARE_HEADERS = ("config", "model", "task", "metric", "base", "head", "change", "95% CI", "verdict")
_SECTIONS = ((REGRESSION, "Regressions"), (IMPROVEMENT, "Improvements"), (NOT_COMPARABLE, "Not comparable"),
             (ADDED, "Added configs"), (REMOVED, "Removed configs"), (UNCHANGED, "Unchanged"))


def _compare_section(comparison: Comparison, base: Run) -> str:
    counts = ", ".join(f"{len(comparison.having(verdict))} {title.lower()}" for verdict, title in _SECTIONS)
    parts = [f"<p>Against <code>{escape(base.describe())}</code>, tolerance {comparison.tolerance:g}: "
             f"{escape(counts)}.</p>"]
    for verdict, title in _SECTIONS:
        findings = comparison.having(verdict)
        if findings:
            parts.append(f"<h3>{escape(title)} ({len(findings)})</h3>")
            parts.append(_table(_COMPARE_HEADERS, [finding_cells(f) for f in findings], numeric={4, 5, 6},
                                row_classes=[verdict.replace(" ", "-")] * len(findings)))
    return "".join(parts)


def _figures(rows: Sequence[dict[str, str]]) -> str:
    parts = []
    for _stem, caption, figure in make_figures(rows):
        data = base64.b64encode(png_bytes(figure)).decode("ascii")
        parts.append(f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{escape(caption)}</figcaption></figure>")
    return "".join(parts) or "<p>No plottable rows (no primary metric with a bpw).</p>"


def build_page(run: Run, base: Run | None = None, tolerance: float = 1.0) -> str:
    comparison = compare_runs(base, run, tolerance) if base is not None else None
    problems = list(comparison.problems if comparison else run.problems)
    title = f"vlm-quant-bench report: {_distinct(run.rows, 'run_id')} ({_distinct(run.rows, 'commit')})"
    sections = [f"<h1>{escape(title)}</h1>", "<h2>Run</h2>", _metadata(run)]
    if problems:
        sections.append('<h2>Input problems</h2><ul class="problems">'
                        + "".join(f"<li>{escape(problem)}</li>" for problem in problems) + "</ul>")
    if comparison is not None:
        sections += ["<h2>Compare</h2>", _compare_section(comparison, base)]
    sections += ["<h2>Results by task</h2>", _task_tables(run.rows), "<h2>Plots</h2>", _figures(run.rows)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def write_report(run_path: str | Path, base_path: str | Path | None = None, output: str | Path | None = None,
                 tolerance: float = 1.0) -> Path:
    """Write the page of a run (dir or CSV), compared with base when given; returns its path."""
    run = load_run(run_path)
    base = load_run(base_path) if base_path is not None else None
    if output is None:
        output = (run.root / REPORT_NAME) if run.root is not None else Path(run_path).with_suffix(".html")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(build_page(run, base, tolerance), encoding="utf-8")
    return output
