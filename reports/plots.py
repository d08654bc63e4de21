"""The run's pictures, from the primary-metric rows of a results file:

- score vs bits per weight, one per (model, task): every config a labelled point, the
  unquantized baseline a dashed line, and for each method its Pareto front (no config of the
  method is both smaller and better); configs are never joined otherwise, because neighbours in
  bpw are unrelated configs (another component, another group size);
- component sensitivity, one per (model, task) that has single-component configs: a heatmap of
  component x weight bits -> relative change vs FP;
- methods at equal size: grouped bars of the change vs FP, per (model, task), bpw bucket and
  activation bits where at least two methods landed (W4A4 and W4A16 are not the same size of
  problem: activation bits are never pooled).

Figures are built on matplotlib's Agg canvas directly rather than through pyplot, so plotting
needs no display, leaves the process-wide backend alone and keeps no figures alive.
"""
from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from reports.schema import is_primary, parse_bool, parse_float

FP_METHOD = "fp"
# Configs whose whole-model bpw differ by less than this fraction share a bucket: the same nominal
# bits, where one method's extra scales (AWQ's input scales) add a few hundredths.
BPW_BUCKET_SPREAD = 0.02
# The narrowest bpw axis a score-vs-size plot gets: configs within hundredths of a bit stay
# together on it rather than filling it as if their sizes differed much.
MIN_BPW_SPAN = 1.0
# Vertical offset (points) between the labels of configs that crowd one spot of the bpw axis.
LABEL_STEP = 9


@dataclass(frozen=True)
class Point:
    config: str
    method: str
    components: str
    w_bits: str
    bpw: float
    value: float
    rel_delta: float | None      # (value - fp) / fp
    a_bits: int = 16             # activation bits (16: not quantized)


def _file_stem(*parts: str) -> str:
    # Model ids contain "/" (org/name); keep names portable and flat.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(parts))


def _points(rows: Sequence[dict[str, str]]) -> list[Point]:
    points = []
    for row in rows:
        bpw, value = parse_float(row.get("bpw")), parse_float(row.get("value"))
        if row.get("method") == FP_METHOD or bpw is None or value is None:
            continue   # the FP baseline is drawn as a line
        fp = parse_float(row.get("fp_value"))
        rel = parse_float(row.get("rel_delta"))
        if rel is None and fp:
            rel = (value - fp) / fp
        a_bits = parse_float(row.get("a_bits"))
        points.append(Point(row.get("config", "") or "?", row.get("method", "") or "?", row.get("components", ""),
                            row.get("w_bits", ""), bpw, value, rel, int(a_bits) if a_bits else 16))
    return points


def _fp_baseline(rows: Sequence[dict[str, str]]) -> float | None:
    """The unquantized score: the last "fp" row, else a quantized row's fp_value."""
    fp_scores = [parse_float(row.get("value")) for row in rows if row.get("method") == FP_METHOD]
    recorded = [parse_float(row.get("fp_value")) for row in rows]
    known = [s for s in fp_scores if s is not None] or [s for s in recorded if s is not None]
    return known[-1] if known else None


def pareto_front(points: Sequence[Point], higher_is_better: bool = True) -> list[Point]:
    """The points no other point beats on both size (fewer bpw) and score, by increasing bpw."""
    sign = 1 if higher_is_better else -1
    front: list[Point] = []
    # Smallest first; at equal size the best first, so a worse twin never enters the front.
    for point in sorted(points, key=lambda p: (p.bpw, -sign * p.value)):
        if not front or sign * point.value > sign * front[-1].value:
            front.append(point)
    return front


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def score_vs_bpw(model: str, task: str, rows: Sequence[dict[str, str]]) -> Figure | None:
    points = _points(rows)
    if not points:
        return None   # a lone baseline line says nothing about quantization
    higher = parse_bool(rows[0].get("higher_is_better")) is not False
    figure = _new_figure(8, 5)
    axes = figure.add_subplot()
    by_method: dict[str, list[Point]] = defaultdict(list)
    for point in points:
        by_method[point.method].append(point)
    for method, members in sorted(by_method.items()):
        scatter = axes.scatter([p.bpw for p in members], [p.value for p in members], label=method, zorder=3)
        front = pareto_front(members, higher)
        if len(front) > 1:
            axes.plot([p.bpw for p in front], [p.value for p in front], color=scatter.get_facecolor()[0],
                      linewidth=1, alpha=0.6, label=f"{method} Pareto front")
    _label_points(axes, points)
    baseline = _fp_baseline(rows)
    if baseline is not None:
        axes.axhline(baseline, linestyle="--", color="gray", label=f"fp ({baseline:.2f})")
    metric = rows[0].get("metric", "") or "value"
    axes.set_xlabel("bits per weight, whole model (bpw)")
    axes.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
    axes.set_title(f"{model} · {task}: score vs size")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def _label_points(axes, points: Sequence[Point]) -> None:
    """Each point labelled with its config; labels of points that crowd one spot (close in bpw
    and in score, on an axis at least MIN_BPW_SPAN wide) are stacked upwards, not overprinted."""
    low, high = min(p.bpw for p in points), max(p.bpw for p in points)
    if high - low < MIN_BPW_SPAN:
        middle = (low + high) / 2
        axes.set_xlim(middle - MIN_BPW_SPAN / 2 - 0.1, middle + MIN_BPW_SPAN / 2 + 0.1)
        low, high = middle - MIN_BPW_SPAN / 2, middle + MIN_BPW_SPAN / 2
    values = [p.value for p in points]
    x_near, y_near = 0.04 * (high - low), 0.04 * ((max(values) - min(values)) or 1.0)
    placed: list[Point] = []
    for point in sorted(points, key=lambda p: (p.bpw, p.value)):
        crowd = sum(abs(other.bpw - point.bpw) <= x_near and abs(other.value - point.value) <= y_near
                    for other in placed)
        axes.annotate(point.config, (point.bpw, point.value), textcoords="offset points",
                      xytext=(4, 4 + LABEL_STEP * crowd), fontsize=7,
                      arrowprops={"arrowstyle": "-", "color": "lightgray", "linewidth": 0.5} if crowd else None)
        placed.append(point)


def _single_bits(point: Point) -> int | None:
    """The weight bits of a config that quantizes exactly one component, else None."""
    if not point.components or "+" in point.components:
        return None
    widths = {part.partition("=")[2] for part in point.w_bits.split(",") if part}
    bits = parse_float(widths.pop()) if len(widths) == 1 else None
    return None if bits is None else int(bits)


def single_component_methods(rows: Sequence[dict[str, str]]) -> list[str]:
    return sorted({p.method for p in _points(rows) if _single_bits(p) is not None and p.rel_delta is not None})


def component_heatmap(model: str, task: str, rows: Sequence[dict[str, str]], method: str) -> Figure | None:
    """One method's cells only: mixing methods in a cell would hide what the component costs."""
    cells: dict[tuple[str, int], float] = {}
    for point in _points(rows):
        bits = _single_bits(point)
        if bits is not None and point.rel_delta is not None and point.method == method:
            cells[(point.components, bits)] = 100 * point.rel_delta
    if not cells:
        return None
    components = sorted({component for component, _ in cells})
    widths = sorted({bits for _, bits in cells}, reverse=True)
    grid = [[cells.get((component, bits), float("nan")) for bits in widths] for component in components]
    figure = _new_figure(max(5.0, 2.0 + 1.3 * len(widths)), 1.6 + 0.7 * len(components))
    axes = figure.add_subplot()
    # Fitted to the data: each side of zero spans its half of the colours, so cells of -0.5% and
    # -3% differ visibly even when another cell lost 60%.
    low, high = min(cells.values()), max(cells.values())
    norm = TwoSlopeNorm(vcenter=0.0, vmin=min(low, -1e-3), vmax=max(high, 1e-3))
    image = axes.imshow(grid, cmap="RdYlGn", norm=norm, aspect="auto")
    for i, component in enumerate(components):
        for j, bits in enumerate(widths):
            value = cells.get((component, bits))
            axes.text(j, i, "no config" if value is None else f"{value:+.1f}%", ha="center", va="center",
                      fontsize=8, color="dimgray" if value is None else "black")
    axes.set_xticks(range(len(widths)), [f"W{bits}" for bits in widths])
    axes.set_yticks(range(len(components)), components)
    axes.set_title(f"{model} · {task} · {method}\none component quantized: change vs FP (%)", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


def bpw_buckets(points: Sequence[Point]) -> list[list[Point]]:
    """Points grouped by nearly equal bpw (within BPW_BUCKET_SPREAD of the bucket's smallest)."""
    buckets: list[list[Point]] = []
    for point in sorted(points, key=lambda p: p.bpw):
        if buckets and point.bpw <= buckets[-1][0].bpw * (1 + BPW_BUCKET_SPREAD):
            buckets[-1].append(point)
        else:
            buckets.append([point])
    return buckets


def methods_at_equal_bpw(groups: dict[tuple[str, str], list[dict[str, str]]]) -> Figure | None:
    """Grouped bars: per (model, task, bpw bucket, activation bits) holding two or more methods, the
    best change vs FP each method reached there, signed so that up is better (a perplexity rise
    points down)."""
    bars: list[tuple[str, dict[str, float]]] = []
    for (model, task), rows in sorted(groups.items()):
        higher = parse_bool(rows[0].get("higher_is_better")) is not False
        for bucket in bpw_buckets([p for p in _points(rows) if p.rel_delta is not None]):
            for a_bits in sorted({p.a_bits for p in bucket}, reverse=True):
                best: dict[str, float] = {}
                for point in (p for p in bucket if p.a_bits == a_bits):
                    # Signed so that up is better on every task, perplexity included.
                    gain = 100 * point.rel_delta * (1 if higher else -1)
                    best[point.method] = max(gain, best.get(point.method, gain))
                if len(best) >= 2:
                    bars.append((f"{model}\n{task}\n≈{bucket[0].bpw:.2f} bpw, A{a_bits}", best))
    if not bars:
        return None
    methods = sorted({method for _, best in bars for method in best})
    figure = _new_figure(max(6.0, 1.6 * len(bars)), 4.5)
    axes = figure.add_subplot()
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i, (_, best) in enumerate(bars) if method in best]
        ys = [best[method] for _, best in bars if method in best]
        drawn = axes.bar(xs, ys, width, label=method)
        axes.bar_label(drawn, fmt="%+.1f", fontsize=7)
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
    axes.set_ylabel("change vs FP (%), up = better")
    axes.set_title("methods at equal size (best config of each method per bpw bucket and activation bits)")
    axes.legend(fontsize=8)
    return figure


def make_figures(rows: Sequence[dict[str, str]]) -> list[tuple[str, str, Figure]]:
    """(file stem, caption, figure) of every plot the primary rows support, in reading order."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        if is_primary(row):
            groups[(row.get("model", ""), row.get("task", ""))].append(row)
    figures = []
    for (model, task), group in sorted(groups.items()):
        figure = score_vs_bpw(model, task, group)
        if figure is not None:
            figures.append((_file_stem(model, task), f"{model} · {task}: score vs bpw", figure))
    for (model, task), group in sorted(groups.items()):
        for method in single_component_methods(group):
            figure = component_heatmap(model, task, group, method)
            if figure is not None:
                figures.append((_file_stem("sensitivity", model, task, method),
                                f"{model} · {task}: component sensitivity ({method})", figure))
    figure = methods_at_equal_bpw(groups)
    if figure is not None:
        figures.append(("methods_at_equal_bpw", "methods at equal bpw", figure))
    return figures


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_results(rows: Sequence[dict[str, str]], out_dir: str | Path) -> list[Path]:
    """Write every plot as a PNG into out_dir; return the paths."""
    out_dir = Path(out_dir)
    written = []
    for stem, _caption, figure in make_figures(rows):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}.png"
        path.write_bytes(png_bytes(figure))
        written.append(path)
    return written
