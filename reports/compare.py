"""Compare two results files and flag primary metrics that got worse.

Rows are matched by (model, task, config_hash, metric): the config hash,
not the config name, identifies what was measured, so a renamed config
still matches and an edited one does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from reports.schema import is_primary, is_random_init, parse_bool, parse_float

MatchKey = tuple[str, str, str, str]

# Float noise (e.g. 70.3 - 69.3) must not turn "exactly at tolerance" into a
# regression.
_EPSILON = 1e-9


@dataclass(frozen=True)
class _Measured:
    config: str
    value: float
    higher_is_better: bool
    random_init: bool = False
    n_samples: str = ""      # as written; "" when unknown
    device_kind: str = ""    # "cpu", "cuda", ...: numerics differ between kinds

    def incomparable_with(self, other: "_Measured") -> str | None:
        """Why two measurements of one config cannot be judged against each other, or None."""
        if self.random_init or other.random_init:
            return "random-init weights"
        if self.n_samples and other.n_samples and self.n_samples != other.n_samples:
            return f"different samples (n {self.n_samples} vs {other.n_samples})"
        if self.device_kind and other.device_kind and self.device_kind != other.device_kind:
            return f"different device kinds ({self.device_kind} vs {other.device_kind})"
        return None


def _latest_by_key(rows: Sequence[dict[str, str]]) -> dict[MatchKey, _Measured]:
    """Primary rows with a numeric value; for repeated keys the last wins."""
    latest: dict[MatchKey, _Measured] = {}
    for row in rows:
        value = parse_float(row.get("value"))
        # A row without a value (the test failed before measuring) counts as
        # absent, so it shows as new/missing rather than as a number.
        if not is_primary(row) or value is None:
            continue
        key = (row.get("model", ""), row.get("task", ""), row.get("config_hash", ""), row.get("metric", ""))
        # Unknown direction defaults to "higher is better", the common case
        # (accuracy, CIDEr, ...).
        higher = parse_bool(row.get("higher_is_better"))
        latest[key] = _Measured(row.get("config", ""), value, higher is not False, is_random_init(row),
                                str(row.get("n_samples") or ""), str(row.get("device") or "").partition(":")[0])
    return latest


def _verdict(base: _Measured | None, head: _Measured | None, tolerance: float) -> str:
    if base is None:
        return "new"
    if head is None:
        return "missing"
    if base.incomparable_with(head):   # a score on other samples, numerics or random weights
        return "not comparable"
    change = head.value - base.value
    worsening = -change if head.higher_is_better else change
    return "REGRESSION" if worsening > tolerance + _EPSILON else "ok"


def _cell(text: str) -> str:
    # A pipe inside a cell would split it into two columns.
    return text.replace("|", "\\|")


def _fmt(measured: _Measured | None) -> str:
    return "-" if measured is None else f"{measured.value:.2f}"


def compare(
    base_rows: Sequence[dict[str, str]],
    head_rows: Sequence[dict[str, str]],
    tolerance: float = 1.0,
) -> tuple[str, bool]:
    """Match primary metrics of base and head and judge each change.

    A regression is head worse than base by more than tolerance (in the
    metric's own units), in the direction given by higher_is_better.
    Returns a markdown report and whether any regression was found.
    """
    base = _latest_by_key(base_rows)
    head = _latest_by_key(head_rows)

    def reading_order(key: MatchKey) -> tuple[str, ...]:
        # Group by model, task and metric; within them order by config name,
        # which a reader recognises (the hash only breaks ties).
        model, task, config_hash, metric = key
        return (model, task, metric, (head.get(key) or base[key]).config, config_hash)

    keys = sorted(set(base) | set(head), key=reading_order)

    lines = [
        "| config | model | task | metric | base | head | change | verdict |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    verdicts = []
    for key in keys:
        model, task, _config_hash, metric = key
        before, after = base.get(key), head.get(key)
        verdict = _verdict(before, after, tolerance)
        verdicts.append(verdict)
        change = "-" if before is None or after is None else f"{after.value - before.value:+.2f}"
        config = (after or before).config
        shown = f"{verdict}: {before.incomparable_with(after)}" if verdict == "not comparable" else verdict
        cells = (config, model, task, metric, _fmt(before), _fmt(after), change, shown)
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")

    regressions = verdicts.count("REGRESSION")
    lines.append("")
    lines.append(
        f"{regressions} regression(s) among {verdicts.count('ok') + regressions} compared "
        f"metrics (tolerance {tolerance:g}); {verdicts.count('new')} new, "
        f"{verdicts.count('missing')} missing, {verdicts.count('not comparable')} not comparable "
        f"(measured on different samples or device kinds, or with random-init weights)."
    )
    return "\n".join(lines), regressions > 0


def same_values(base_rows: Sequence[dict[str, str]], head_rows: Sequence[dict[str, str]]) -> tuple[str, bool]:
    """Every (test_id, metric) value of base against head, exactly as written. For a change that
    must not move any number (a refactor, a faster path), where config hashes may differ."""
    def values(rows):
        return {(row.get("test_id", ""), row.get("metric", "")): row.get("value", "") for row in rows
                if row.get("metric")}

    base, head = values(base_rows), values(head_rows)
    lines = [f"| {_cell(test)} | {metric} | {base.get((test, metric), '-')} | {head.get((test, metric), '-')} |"
             for test, metric in sorted(set(base) | set(head)) if base.get((test, metric)) != head.get((test, metric))]
    identical = not lines
    summary = (f"{len(base)} values in base, {len(head)} in head: "
               + ("all identical." if identical else f"{len(lines)} differ or are missing on one side."))
    if identical:
        return summary, True
    return "\n".join(["| test | metric | base | head |", "|---|---|---:|---:|", *lines, "", summary]), False
