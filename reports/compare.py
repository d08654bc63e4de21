"""Compare two runs and judge each primary metric: regression, improvement, unchanged, not
comparable, added or removed.

Rows are matched by (model, task, config_hash, metric): the config hash, not the config name,
identifies what was measured, so a renamed config still matches and an edited one does not.
A change only counts when both sides measured the same thing the same way (same samples, same
device kind, trained weights). When both sides are run dirs with per-sample logs, a change must
also be beyond the noise: its paired bootstrap interval (reports/paired.py) must exclude zero.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from reports.paired import PairedInterval, paired_bootstrap, read_sample_scores, score_fields
from reports.runs import Run
from reports.schema import is_primary, is_random_init, parse_bool, parse_float

MatchKey = tuple[str, str, str, str]

# Float noise (e.g. 70.3 - 69.3) must not turn "exactly at tolerance" into a regression.
_EPSILON = 1e-9

# Columns that say which samples a score was measured on. n_samples is in the contract; the
# others are used when a results file has them (written by newer runs), and compared only when
# both sides give a value.
SAMPLE_IDENTITY_COLUMNS = ("n_samples", "split", "data_source", "sample_seed", "subset")

REGRESSION, IMPROVEMENT, UNCHANGED = "REGRESSION", "improvement", "ok"
NOT_COMPARABLE, ADDED, REMOVED = "not comparable", "added", "removed"


@dataclass(frozen=True)
class Measured:
    """One side's primary metric of one matched key, with what decides comparability."""
    row: dict[str, str]
    value: float

    @property
    def config(self) -> str:
        return self.row.get("config", "")

    @property
    def higher_is_better(self) -> bool:
        # Unknown direction defaults to "higher is better", the common case (accuracy, CIDEr).
        return parse_bool(self.row.get("higher_is_better")) is not False

    @property
    def device_kind(self) -> str:
        return str(self.row.get("device") or "").partition(":")[0]   # "cuda:1" -> "cuda"

    def incomparable_with(self, other: "Measured") -> str | None:
        """Why two measurements of one config cannot be judged against each other, or None."""
        if is_random_init(self.row) or is_random_init(other.row):
            return "random-init weights"
        for column in SAMPLE_IDENTITY_COLUMNS:
            mine, theirs = str(self.row.get(column) or ""), str(other.row.get(column) or "")
            if mine and theirs and mine != theirs:
                short = "n" if column == "n_samples" else column
                return f"different samples ({short} {mine} vs {theirs})"
        if self.device_kind and other.device_kind and self.device_kind != other.device_kind:
            return f"different device kinds ({self.device_kind} vs {other.device_kind})"
        return None


@dataclass(frozen=True)
class Finding:
    key: MatchKey
    verdict: str
    base: Measured | None
    head: Measured | None
    reason: str = ""                       # not comparable: why; otherwise what the evidence was
    interval: PairedInterval | None = None

    @property
    def config(self) -> str:
        return (self.head or self.base).config

    @property
    def change(self) -> float | None:
        return None if self.base is None or self.head is None else self.head.value - self.base.value


@dataclass
class Comparison:
    findings: list[Finding]
    tolerance: float
    problems: list[str] = field(default_factory=list)   # damaged inputs, unusable sample logs
    # What the head lacks against the base, one line each: a primary metric without a numeric
    # value (failed, crashed, garbage), records lost to damage, and (unless removals are allowed)
    # metrics the base has and the head does not. Any of it makes the compare exit non-zero.
    head_missing: list[str] = field(default_factory=list)

    @property
    def regressed(self) -> bool:
        return any(finding.verdict == REGRESSION for finding in self.findings)

    @property
    def incomplete(self) -> bool:
        return bool(self.head_missing)

    def having(self, verdict: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.verdict == verdict]


def _latest_by_key(rows: Sequence[dict[str, str]]) -> dict[MatchKey, Measured]:
    """Primary rows with a numeric value; for repeated keys the last wins."""
    latest: dict[MatchKey, Measured] = {}
    for row in rows:
        value = parse_float(row.get("value"))
        # A row without a value (the test failed before measuring) counts as absent, so it
        # shows as added/removed rather than as a number.
        if not is_primary(row) or value is None:
            continue
        latest[_key(row)] = Measured(dict(row), value)
    return latest


def _interval(base_run: Run, head_run: Run, key: MatchKey, base: Measured, head: Measured,
              problems: list[str]) -> tuple[PairedInterval | None, str]:
    """The paired bootstrap interval of head - base, or None and the reason there is none."""
    model, task, _hash, _metric = key
    if base_run.root is None or head_run.root is None:
        return None, "tolerance only: a side is a CSV file, not a run dir with per-sample logs"
    fields = score_fields(task)
    if fields is None:
        return None, f"tolerance only: {task} has no per-sample score (corpus-level metric or unknown task)"
    sides = []
    for run, measured in ((base_run, base), (head_run, head)):
        n_samples = parse_float(measured.row.get("n_samples"))
        path = run.samples_path(model, task, measured.config)
        if path is None:      # a row naming a path (../x) is data, never followed
            return None, "tolerance only: the row's model, task or config is not a plain file name"
        scores, note = read_sample_scores(path, fields, measured.value,
                                          None if n_samples is None else int(n_samples))
        if note:
            problems.append(note)
        if scores is None:
            return None, "tolerance only: per-sample log missing or unusable (see problems)"
        sides.append(scores)
    interval = paired_bootstrap(*sides)
    if interval is None:
        return None, "tolerance only: fewer than two samples scored by both runs"
    return interval, f"paired on {interval.n_paired} samples"


def _judge(base_run: Run, head_run: Run, key: MatchKey, base: Measured | None, head: Measured | None,
           tolerance: float, problems: list[str]) -> Finding:
    if base is None:
        return Finding(key, ADDED, None, head)
    if head is None:
        return Finding(key, REMOVED, base, None)
    reason = base.incomparable_with(head)
    if reason:   # a score on other samples, numerics or random weights
        return Finding(key, NOT_COMPARABLE, base, head, reason)
    change = head.value - base.value
    gain = change if head.higher_is_better else -change
    if abs(gain) <= tolerance + _EPSILON:
        return Finding(key, UNCHANGED, base, head, "within tolerance")
    interval, evidence = _interval(base_run, head_run, key, base, head, problems)
    if interval is not None and not interval.excludes_zero():
        return Finding(key, UNCHANGED, base, head, f"beyond tolerance but within noise ({evidence})", interval)
    return Finding(key, REGRESSION if gain < 0 else IMPROVEMENT, base, head, evidence, interval)


def _key(row: dict[str, str]) -> MatchKey:
    return row.get("model", ""), row.get("task", ""), row.get("config_hash", ""), row.get("metric", "")


def _head_missing(base: dict[MatchKey, Measured], head: dict[MatchKey, Measured], head_run: Run,
                  allow_removed: bool) -> list[str]:
    """What the head lacks of the base's primary metrics (see Comparison.head_missing)."""
    without_value = {_key(row): row for row in head_run.rows if is_primary(row) and _key(row) not in head}
    missing = []
    for key in sorted(set(base) - set(head)):
        model, task, _hash, metric = key
        label = f"{base[key].config} {model} {task} {metric}"
        row = without_value.get(key)
        if row is not None:
            shown = f"value {row.get('value')!r}" if row.get("value") else "no value"
            missing.append(f"{label}: {shown} in head (status {row.get('status') or '?'})")
        elif not allow_removed:
            missing.append(f"{label}: not in head (pass --allow-removed if the config was dropped on purpose)")
    missing += [f"head input damaged: {problem}" for problem in head_run.lost]
    return missing


def compare_runs(base_run: Run, head_run: Run, tolerance: float = 1.0, allow_removed: bool = False) -> Comparison:
    """Match the primary metrics of two runs and judge each (see the module docstring)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 (a worsening allowed, in the metric's units), got {tolerance:g}")
    base, head = _latest_by_key(base_run.rows), _latest_by_key(head_run.rows)
    problems = [f"base: {text}" for text in base_run.problems] + [f"head: {text}" for text in head_run.problems]

    def reading_order(key: MatchKey) -> tuple[str, ...]:
        # Group by model, task and metric; within them by config name, which a reader
        # recognises (the hash only breaks ties).
        model, task, config_hash, metric = key
        return (model, task, metric, (head.get(key) or base[key]).config, config_hash)

    findings = [_judge(base_run, head_run, key, base.get(key), head.get(key), tolerance, problems)
                for key in sorted(set(base) | set(head), key=reading_order)]
    return Comparison(findings, tolerance, problems, _head_missing(base, head, head_run, allow_removed))


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


def _cell(text: str) -> str:
    # A pipe inside a cell would split it into two columns.
    return text.replace("|", "\\|")
