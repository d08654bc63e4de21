"""Reading what a run left behind, tolerantly: a results CSV or a whole run dir (see rundir.py).

The report commands (compare, html, merge) take either form. Damage is expected in CI artifacts
(a worker killed mid-write, an upload cut short), so every reader here turns damage into a
warning that names the file and keeps what it can; only input with nothing usable in it is an
error (UnusableInput), which the command line prints as one line and exits 2.
"""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from reports.csv_log import read_rows


class UnusableInput(ValueError):
    """Input from which no results at all can be read; the message names the path."""


@dataclass
class Run:
    """One run's rows, where they came from, and what was wrong with them."""
    source: Path
    rows: list[dict[str, str]]
    root: Path | None = None            # the run dir, when given one (per-sample logs, junit.xml)
    problems: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)   # the problems that cost rows (torn records, parts)

    def describe(self) -> str:
        """Where the rows came from and which run(s) made them, for a report's header."""
        def distinct(column: str) -> str:
            values = sorted({row.get(column) or "" for row in self.rows} - {""})
            return ", ".join(values) or "unknown"
        return (f"{self.source} (run {distinct('run_id')}, commit {distinct('commit')}, "
                f"device {distinct('device')}, {len(self.rows)} rows)")

    def samples_path(self, model: str, task: str, config: str) -> Path | None:
        """None also for names that are not plain file names: rows are data, never paths."""
        if self.root is None or not all(_plain_name(name) for name in (model, task, config)):
            return None
        return self.root / "samples" / model / task / f"{config}.jsonl"


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(char in name for char in "/\\\0")


def read_csv_tolerantly(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a results CSV and the reader's warnings as text. A file that is not a results
    CSV at all (missing, empty, foreign header, malformed quoting) raises UnusableInput."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rows = read_rows(path)
        except (OSError, ValueError, csv.Error) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            # OSError messages do not always name the file; ValueErrors from read_rows do.
            raise UnusableInput(reason if str(path) in reason else f"{path}: {reason}") from None
    return rows, [str(warning.message) for warning in caught]


def load_run(path: str | Path) -> Run:
    """A results CSV file, or a run dir (its results.csv, else the CSV parts a crashed run left)."""
    path = Path(path)
    if path.is_dir():
        return _load_run_dir(path)
    if not path.exists():
        raise UnusableInput(f"{path}: no such file or run directory")
    rows, problems = read_csv_tolerantly(path)
    if not rows:
        raise UnusableInput(f"{path}: no results rows ({'; '.join(problems) or 'only a header'})")
    return Run(path, rows, None, problems, list(problems))


def _load_run_dir(root: Path) -> Run:
    """Its results.csv; when that is missing or damaged (torn records, not a results CSV at all)
    and the parts/ its run merged it from are there, the rows rebuilt from the parts as the
    session end builds them (each whole test once, its latest attempt)."""
    results = root / "results.csv"
    rows: list[dict[str, str]] = []
    damage: list[str] = []
    if results.is_file():
        try:
            rows, problems = read_csv_tolerantly(results)
            if rows and not problems:
                return Run(results, rows, root, [])
            damage = problems or [f"{results}: no results rows"]
        except UnusableInput as error:
            rows, damage = [], [str(error)]
    rebuilt = _rows_from_parts(root)
    if rebuilt is not None:
        rows_from_parts, part_problems = rebuilt
        note = (f"{results} damaged ({'; '.join(damage)}): rebuilt from parts/" if damage
                else f"{root}: no results.csv, rebuilt from parts/")
        lost = [problem for problem in part_problems if not problem.endswith("empty part file skipped")]
        return Run(root / "parts", rows_from_parts, root, [note, *part_problems], lost)
    if rows:
        return Run(results, rows, root, damage, list(damage))
    if damage:
        raise UnusableInput("; ".join(damage) + " (and no parts/ to rebuild it from)")
    raise UnusableInput(f"{root}: a directory without results.csv or parts/results-*.csv")


def _rows_from_parts(root: Path) -> tuple[list[dict[str, str]], list[str]] | None:
    """(rows, problems) merged from parts/ like the session end does; None without usable parts."""
    from reports.rundir import RunDir     # rundir imports this module's neighbours; import late

    if not any((root / "parts").glob("results-*.csv")):
        return None
    merged = RunDir(root).recorded()
    return (merged.rows, merged.problems) if merged.rows else None


def read_jsonl_tolerantly(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a per-sample log; damaged lines (a cut-off upload) are skipped, each with
    a problem naming the file and line. A missing or unreadable file is one problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return [], [f"{path}: unreadable per-sample log ({error.__class__.__name__}: {error})"]
    records, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{path}: line {number}: skipped, not JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path}: line {number}: skipped, not a JSON object")
            continue
        records.append(record)
    return records, problems
