"""A fixed-width terminal table of each test's headline (primary) metric."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from reports.schema import is_primary, is_random_init, parse_float

TEST_ID_WIDTH = 56
_ELLIPSIS = "…"


def shorten_test_id(test_id: str, width: int = TEST_ID_WIDTH) -> str:
    """Fit a test id into width characters, cutting from the middle.

    Both ends carry meaning: the start names the test function, the end
    holds the parametrize id (model-config-task), so the middle goes.
    """
    if len(test_id) <= width:
        return test_id
    tail = (width - 1) * 2 // 3
    head = width - 1 - tail
    return test_id[:head] + _ELLIPSIS + test_id[-tail:]


def _number(text: str, signed: bool = False) -> str:
    number = parse_float(text)
    if number is None:
        # Keep non-numeric text visible (it may explain itself); blank is "-".
        return text if text else "-"
    return f"{number:+.2f}" if signed else f"{number:.2f}"


def _rows_to_show(rows: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """One row per test: its primary metric, in the order tests were logged.

    A test that failed or was skipped before measuring has no primary row;
    its first row is shown instead so the failure does not vanish.
    """
    chosen: dict[str, dict[str, str]] = {}
    for row in rows:
        test_id = row.get("test_id", "")
        current = chosen.get(test_id)
        if current is None or (is_primary(row) and not is_primary(current)):
            chosen[test_id] = row
    return [
        row for row in chosen.values() if is_primary(row) or row.get("status", "") != "passed"
    ]


def bits_label(row: dict[str, str]) -> str:
    """Weight and activation bits side by side: w4a16, w4a4 (tensor-minmax), w4,8a16."""
    widths = sorted({part.partition("=")[2] for part in row.get("w_bits", "").split(",") if "=" in part},
                    key=lambda b: int(b) if b.isdigit() else 0)
    label = f"w{','.join(widths) or '16'}a{row.get('a_bits') or '16'}"
    how = row.get("a_quant", "")
    if how:   # a4-tensor-minmax-asym -> tensor-minmax-asym
        label += f" ({how.partition('-')[2]})"
    return label


def format_summary(rows: Sequence[dict[str, str]]) -> str:
    """Render the primary-metric rows as a table for the terminal."""
    shown = _rows_to_show(rows)
    if not shown:
        return "no results recorded"

    headers = ("test_id", "bits", "metric", "value", "fp_value", "delta", "bpw", "quant s", "eval s", "status")
    table = [
        (
            shorten_test_id(row.get("test_id", "")),
            bits_label(row),
            row.get("metric", ""),
            _number(row.get("value", "")),
            _number(row.get("fp_value", "")),
            _number(row.get("delta", ""), signed=True),
            _number(row.get("bpw", "")),
            _number(row.get("quant_seconds", "")),
            _number(row.get("eval_seconds", "")),
            row.get("status", "") + (" (random-init)" if is_random_init(row) else ""),
        )
        for row in shown
    ]
    widths = [max(len(line[i]) for line in (headers, *table)) for i in range(len(headers))]
    # Text columns read best left-aligned, numbers right-aligned so the
    # decimal points line up.
    text_columns = {0, 1, 2, 9}

    def render(cells: Sequence[str]) -> str:
        padded = (
            cell.ljust(width) if i in text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        )
        return "  ".join(padded).rstrip()

    lines = [render(headers), render(["-" * width for width in widths])]
    lines += [render(line) for line in table]
    lines.append(_status_footer(shown))
    random = sum(is_random_init(row) for row in shown)
    if random:
        lines.append(f"{random} of them on random-init weights: timings and memory only, never accuracy")
    return "\n".join(lines)


def _status_footer(shown: Sequence[dict[str, str]]) -> str:
    counts = Counter(row.get("status", "") or "unknown" for row in shown)
    parts = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    noun = "test" if len(shown) == 1 else "tests"
    return f"{len(shown)} {noun}: {parts}"
