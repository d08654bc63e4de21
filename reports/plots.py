"""Accuracy-versus-size plots: one PNG per (model, task).

Figures are built on matplotlib's Agg canvas directly rather than through
pyplot, so plotting needs no display, leaves the process-wide backend
alone and keeps no figures alive after saving.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reports.schema import is_primary, parse_float

FP_METHOD = "fp"


def _file_name(model: str, task: str) -> str:
    # Model ids contain "/" (org/name); keep names portable and flat.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}__{task}")
    return f"{stem}.png"


def _fp_baseline(rows: Sequence[dict[str, str]]) -> float | None:
    """The unquantized score: the last "fp" row, else a quantized row's fp_value."""
    fp_scores = [parse_float(row.get("value")) for row in rows if row.get("method") == FP_METHOD]
    recorded = [parse_float(row.get("fp_value")) for row in rows]
    known = [score for score in fp_scores if score is not None] or [
        score for score in recorded if score is not None
    ]
    return known[-1] if known else None


def _series(rows: Sequence[dict[str, str]]) -> dict[str, list[tuple[float, float]]]:
    """(bpw, value) points per quantization method, sorted by bpw."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        if row.get("method") == FP_METHOD:
            continue  # drawn as the baseline line instead
        bpw, value = parse_float(row.get("bpw")), parse_float(row.get("value"))
        if bpw is None or value is None:
            continue
        points[row.get("method", "") or "?"].append((bpw, value))
    return {method: sorted(pts) for method, pts in sorted(points.items())}


def _draw(model: str, task: str, rows: Sequence[dict[str, str]], path: Path) -> bool:
    series = _series(rows)
    baseline = _fp_baseline(rows)
    if not series:
        return False  # a lone baseline line says nothing about quantization

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method, points in series.items():
        xs, ys = zip(*points)
        axes.plot(xs, ys, marker="o", label=method)
    if baseline is not None:
        axes.axhline(baseline, linestyle="--", color="gray", label=f"fp ({baseline:.2f})")

    metrics = sorted({row.get("metric", "") for row in rows} - {""})
    axes.set_xlabel("bits per weight (bpw)")
    axes.set_ylabel(", ".join(metrics) or "value")
    axes.set_title(f"{model} · {task}")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png", dpi=120)
    return True


def plot_results(rows: Sequence[dict[str, str]], out_dir: str | Path) -> list[Path]:
    """Write one primary-metric-vs-bpw PNG per (model, task); return the paths."""
    out_dir = Path(out_dir)
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        if is_primary(row):
            groups[(row.get("model", ""), row.get("task", ""))].append(row)

    written = []
    for (model, task), group in sorted(groups.items()):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / _file_name(model, task)
        if _draw(model, task, group, path):
            written.append(path)
    return written
