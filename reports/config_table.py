"""Markdown tables of a run by config: one table per model, a row per config in the grid's order,
a column per task holding the primary metric and, beside it, the task's diagnostics (the share
of replies that fail the answer format), then the config's quantization seconds.

The layout of a method-comparison table (Q-VLM's paper, its ablation), where pivot.py's layout
(method x components by bit width) fits sweeps over bit widths."""
from __future__ import annotations

from collections.abc import Sequence

from reports.schema import is_primary, parse_float
from tasks.registry import TASKS, UnknownTask

# The diagnostic shown beside a score: the first of the task's diagnostics (a failure rate).
_FAILURE_RATE = 0


def _failure_metric(task: str) -> str | None:
    try:
        diagnostics = TASKS.get(task).diagnostics
    except UnknownTask:
        return None
    return diagnostics[_FAILURE_RATE] if diagnostics else None


def _cell(score: str | None, failures: str | None) -> str:
    value = parse_float(score)
    if value is None:
        return "-"
    rate = parse_float(failures)
    return f"{value:.2f}" if rate is None else f"{value:.2f} ({rate:.1f}%)"


def format_config_tables(rows: Sequence[dict[str, str]], title: str = "") -> str:
    """One markdown table per model: rows = configs (the unquantized first, then by weight bits,
    widest first, and name), columns = tasks."""
    models: dict[str, dict[str, dict[str, dict[str, str]]]] = {}   # model -> config -> task -> metric -> value
    order: dict[str, tuple] = {}
    seconds: dict[tuple[str, str], float] = {}
    passed: dict[tuple[str, str, str], bool] = {}
    for row in rows:
        model, config, task = row.get("model", ""), row.get("config", ""), row.get("task", "")
        models.setdefault(model, {}).setdefault(config, {}).setdefault(task, {})[row.get("metric", "")] = \
            row.get("value", "")
        bits = [parse_float(part.partition("=")[2]) or 16 for part in row.get("w_bits", "").split(",") if part]
        order[config] = (row.get("method") != "fp", -max(bits, default=16), config)
        if is_primary(row):
            models[model][config][task]["__primary__"] = row.get("value", "")
            passed[(model, config, task)] = row.get("status", "passed") == "passed"
            quant = parse_float(row.get("quant_seconds"))
            if quant is not None:
                seconds[(model, config)] = max(quant, seconds.get((model, config), 0.0))
    parts = [f"{title}\n"] if title else []
    for model, configs in models.items():
        tasks = sorted({task for by_task in configs.values() for task in by_task})
        failure = {task: _failure_metric(task) for task in tasks}
        header = [model, *(f"{task}" + (f" ({failure[task]} %)" if failure[task] else "") for task in tasks),
                  "quantization s"]
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for config, by_task in sorted(configs.items(), key=lambda item: order[item[0]]):
            cells = []
            for task in tasks:
                metrics = by_task.get(task, {})
                cell = _cell(metrics.get("__primary__"), metrics.get(failure[task]) if failure[task] else None)
                cells.append(cell if passed.get((model, config, task), True) else f"{cell} (failed)")
            quant = seconds.get((model, config))
            lines.append("| " + " | ".join([config, *cells, "-" if quant is None else f"{quant:.1f}"]) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
