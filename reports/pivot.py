"""Markdown pivot tables of the primary metric: method x components rows, bit-width columns.

One table per (model, task) puts each method's score, bpw and quantization time at each weight
width side by side, the layout of a quantization paper's main results table."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from reports.schema import is_primary, parse_float

METHOD_ORDER = ("fp", "rtn", "gptq", "awq")
# Pipeline order, image side first; a set of several components sorts after single ones.
COMPONENT_ORDER = ("vision", "qformer", "connector", "language")


def uniform_bits(w_bits: str) -> int | None:
    """The single weight width of a config, or None when its components differ.

    w_bits names only the quantized components ("qformer=4,vision=4"); FP rows say "all=16".
    """
    widths = {parse_float(part.partition("=")[2]) for part in w_bits.split(",")}
    width = widths.pop() if len(widths) == 1 else None
    return None if width is None else int(width)


def _sort_key(key: tuple[str, str, str]) -> tuple:
    method, components, variant = key
    # The CSV joins a config's components with "+", sorted by name, so "all" arrives spelt out
    # ("connector+language+vision" for LLaVA); the largest set sorts last, as "all" should.
    parts = components.split("+")
    ranks = sorted(COMPONENT_ORDER.index(p) if p in COMPONENT_ORDER else 99 for p in parts)
    method_rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    size = 99 if components == "all" else len(parts)
    return method_rank, method, size, ranks, components, variant


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _cell(row: dict[str, str]) -> str:
    columns = ("value", "rel_delta", "bpw", "quant_seconds")
    value, rel, bpw, seconds = (parse_float(row[column]) for column in columns)
    shown = _number(value) + ("" if rel is None else f" ({rel:+.1%})")
    # A test that missed its grid expectation still measured a real value: show it, marked.
    mark = " (failed)" if row["status"] == "failed" else ""
    return f"{shown} · {_number(bpw)} · {_number(seconds)}s{mark}"


def _group_label(row: dict[str, str]) -> str:
    return "per-channel" if row["group_size"] == "-1" else f"g{row['group_size']}"


def _keyed(rows: list[dict[str, str]]) -> list[tuple[tuple[str, str, str], dict[str, str]]]:
    """Give each row a (method, components, variant) key, unique per bit width.

    The variant stays empty unless a (method, components) pair has two configs at one width
    (group-size or layer-range variants): then it is the group size if that tells them
    apart, else the config name.
    """
    pairs: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        pairs[row["method"], row["components"]].append(row)
    variants = (lambda row: "", _group_label, lambda row: row["config"])
    keyed = []
    for (method, components), members in pairs.items():
        for variant in variants:
            slots = [(variant(row), uniform_bits(row["w_bits"])) for row in members]
            if len(set(slots)) == len(slots):
                break
        keyed += [((method, components, variant(row)), row) for row in members]
    return keyed


def _table(model: str, task: str, rows: list[dict[str, str]], bits: Sequence[int] | None) -> str:
    fp = [row for row in rows if row["method"] == "fp"]
    quantized = [row for row in rows if row["method"] != "fp"]
    # Without an FP test in the file, the quantized rows still carry its value.
    fp_value = parse_float((fp or quantized)[0]["value" if fp else "fp_value"])
    metrics = ", ".join(sorted({row["metric"] for row in rows}))
    mixed = [row for row in quantized if uniform_bits(row["w_bits"]) is None]
    found = {uniform_bits(row["w_bits"]) for row in quantized} - {None}
    widths = bits or sorted(found, reverse=True)
    shown = [row for row in quantized if uniform_bits(row["w_bits"]) in widths]
    cells: dict[tuple[str, str, str], dict[int, str]] = defaultdict(dict)
    for key, row in _keyed(shown):
        cells[key][uniform_bits(row["w_bits"])] = _cell(row)
    header = ["method", "components", *(f"w{width}" for width in widths)]
    lines = [f"### {task} ({metrics}, {model})", "", f"FP: {_number(fp_value)}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, components, variant in sorted(cells, key=_sort_key):
        label = f"{components} ({variant})" if variant else components
        row_cells = [cells[method, components, variant].get(width, "-") for width in widths]
        lines.append("| " + " | ".join([method, label, *row_cells]) + " |")
    if mixed:
        # A config with several widths fits no single column; name it rather than drop it.
        names = ", ".join(f"{row['config']} ({row['w_bits']})" for row in mixed)
        lines += ["", f"Mixed widths, not in the table: {names}"]
    return "\n".join(lines)


def format_tables(rows: Sequence[dict[str, str]], model: str | None = None, task: str | None = None,
                  bits: Sequence[int] | None = None) -> str:
    """Render one markdown pivot table per (model, task) of the measured primary-metric rows:
    passed tests, and failed ones (a missed expectation), which are marked."""
    # Keyed by test: a rerun merged into the same file replaces the earlier result.
    latest = {row["test_id"]: row for row in rows if is_primary(row) and row["status"] in ("passed", "failed")
              and model in (None, row["model"]) and task in (None, row["task"])}
    if not latest:
        if model is None and task is None:
            return "no results recorded"
        # A mistyped filter should not look like an empty but successful run.
        raise ValueError(f"no measured primary results for model={model!r} task={task!r}")
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for row in latest.values():
        groups[row["model"], row["task"]].append(row)
    return "\n\n".join(_table(m, t, group, bits) for (m, t), group in sorted(groups.items()))
