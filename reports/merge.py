"""Join the run dirs of grid shards (one CI job each) into one run dir:

    results.csv   every shard's rows; a row repeated across shards (a test re-run on another
                  shard, a retried job) is kept once per (test_id, metric, config_hash): the one
                  with the latest timestamp, the later shard on the command line on a tie. When
                  the repeats disagree on the value, a warning says which was kept.
    junit.xml     one <testsuites> holding every shard's <testsuite>, each test once (the
                  testcase of the shard whose rows were kept, else the later shard's), the
                  counts recounted from the testcases kept
    samples/      every per-sample log; for a (model, task, config) logged by several shards,
                  the log of the shard whose row was kept
    plots/, report.html   made from the merged rows

Damage (an unreadable shard, a torn CSV record, a corrupt junit.xml, a cut JSONL line) is a
warning and is skipped; a shard whose results.csv is damaged is rebuilt from its parts/ when it
has them (reports/runs.py); only shards with nothing usable at all make the merge fail.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from reports.csv_log import PartWriter
from reports.html import REPORT_NAME, build_page
from reports.plots import plot_results
from reports.runs import Run, UnusableInput, load_run, read_jsonl_tolerantly
from reports.schema import parse_float

RowKey = tuple[str, str, str]
_OLDEST = datetime.min.replace(tzinfo=timezone.utc)
_JUNIT_COUNTS = ("tests", "failures", "errors", "skipped")


def _timestamp(row: dict[str, str]) -> datetime:
    try:
        moment = datetime.fromisoformat(row.get("timestamp") or "")
    except ValueError:
        return _OLDEST   # no usable time: any timed repeat wins over it
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def merge_rows(shards: Sequence[Run], warnings: list[str]) -> tuple[list[dict[str, str]], dict[tuple, int]]:
    """The de-duplicated rows in first-seen order, and for each (model, task, config) and each
    test_id the index of the shard whose rows were kept."""
    kept: dict[RowKey, tuple[datetime, int, dict[str, str]]] = {}
    disagreements: dict[str, set[str]] = {}     # test_id -> the metrics whose repeats differ
    for index, shard in enumerate(shards):
        for row in shard.rows:
            key = (row.get("test_id", ""), row.get("metric", ""), row.get("config_hash", ""))
            previous = kept.get(key)
            if previous is not None and previous[2].get("value") != row.get("value"):
                disagreements.setdefault(key[0], set()).add(key[1])
            if previous is None or _timestamp(row) >= previous[0]:
                kept[key] = (_timestamp(row), index, row)
    for test_id, metrics in disagreements.items():
        winner = next(kept[key][1] for key in kept if key[0] == test_id and key[1] in metrics)
        warnings.append(f"{test_id}: shards measured different values ({len(metrics)} metric(s)); "
                        f"kept the latest, from {shards[winner].source}")
    owners = {(row.get("model", ""), row.get("task", ""), row.get("config", "")): index
              for _when, index, row in kept.values()}
    owners.update({row.get("test_id", ""): index for _when, index, row in kept.values()})
    return [row for _when, _index, row in kept.values()], owners


def _write_results(rows: list[dict[str, str]], path: Path) -> None:
    # Written beside the target and renamed over it: a reader never sees half a file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    PartWriter(temporary).write_rows(rows)
    temporary.replace(path)


def _test_id(classname: str, name: str) -> str:
    """The results' test_id of a pytest JUnit testcase (classname benchmarks.test_vqav2)."""
    return f"{classname.replace('.', '/')}.py::{name}"


def _recount(suite: ElementTree.Element) -> None:
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(case.find("failure") is not None for case in cases)))
    suite.set("errors", str(sum(case.find("error") is not None for case in cases)))
    suite.set("skipped", str(sum(case.find("skipped") is not None for case in cases)))


def merge_junit(shards: Sequence[Path], out: Path, warnings: list[str], owners: dict | None = None,
                indexes: Sequence[int] | None = None) -> None:
    """Every shard's suites under one <testsuites>, each testcase once: a test that several
    shards ran (a retried job, a shard given twice) keeps the testcase of the shard whose rows
    were kept (owners: test_id -> shard index, as merge_rows gives them), else the later one."""
    owners = owners or {}
    indexes = list(indexes) if indexes is not None else list(range(len(shards)))
    suites: list[tuple[int, ElementTree.Element]] = []
    for index, root in zip(indexes, shards):
        path = root / "junit.xml"
        if not path.is_file():
            warnings.append(f"{path}: missing, no JUnit results from this shard")
            continue
        try:
            top = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as error:
            warnings.append(f"{path}: skipped, not well-formed XML ({error})")
            continue
        suites += [(index, suite) for suite in ([top] if top.tag == "testsuite" else top.findall("testsuite"))]
    chosen: dict[tuple[str, str], int] = {}      # (classname, name) -> position of the suite that keeps it
    for position, (index, suite) in enumerate(suites):
        for case in suite.findall("testcase"):
            key = (case.get("classname", ""), case.get("name", ""))
            owner = owners.get(_test_id(*key))
            if key not in chosen or owner is None or owner == index:
                chosen[key] = position
    merged = ElementTree.Element("testsuites")
    seconds = 0.0
    for position, (_index, suite) in enumerate(suites):
        for case in suite.findall("testcase"):
            if chosen[(case.get("classname", ""), case.get("name", ""))] != position:
                suite.remove(case)
        _recount(suite)
        seconds += parse_float(suite.get("time")) or 0.0
        merged.append(suite)
    for count in _JUNIT_COUNTS:
        merged.set(count, str(sum(int(suite.get(count) or 0) for _index, suite in suites)))
    merged.set("time", f"{seconds:.3f}")
    ElementTree.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)


def merge_samples(shards: Sequence[Path], owners: dict[tuple, int], out: Path, warnings: list[str]) -> None:
    chosen: dict[Path, Path] = {}     # relative path -> the shard file to copy
    for index, root in enumerate(shards):
        for log in sorted((root / "samples").glob("*/*/*.jsonl")):
            relative = log.relative_to(root / "samples")
            model, task, config = relative.parts[0], relative.parts[1], relative.stem
            owner = owners.get((model, task, config))
            # The owning shard's log wins; without an owner (no row kept), the later shard's.
            if owner is None or owner == index or relative not in chosen:
                chosen[relative] = log
    for relative, log in sorted(chosen.items()):
        records, problems = read_jsonl_tolerantly(log)
        warnings.extend(problems)
        target = out / "samples" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if problems:   # keep the intact records only: a torn line would break every later reader
            target.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        else:
            target.write_bytes(log.read_bytes())


def _copy_identity(shards: Sequence[Path], out: Path, warnings: list[str]) -> None:
    """The shards' run-identity.json (the samples and models measured), so that --resume of the
    merged dir is checked like any run dir's; shards that disagree leave it out and say so."""
    found = {}
    for shard in shards:
        try:
            found[shard] = json.loads((shard / "run-identity.json").read_text())
        except (OSError, ValueError):
            continue
    distinct = {json.dumps(identity, sort_keys=True) for identity in found.values()}
    if len(distinct) == 1:
        (out / "run-identity.json").write_text(distinct.pop(), encoding="utf-8")
    elif distinct:
        warnings.append(f"run-identity.json differs between shards ({', '.join(map(str, found))}): not copied; "
                        f"the merged dir mixes samples or models")


def merge_runs(out_dir: str | Path, shard_dirs: Sequence[str | Path]) -> list[str]:
    """Merge shard run dirs into out_dir (see the module docstring); returns the warnings."""
    out = Path(out_dir)
    shard_paths = [Path(shard) for shard in shard_dirs]
    for shard in shard_paths:
        if not shard.is_dir():
            raise UnusableInput(f"{shard}: not a run directory")
        if shard.resolve() == out.resolve():
            raise UnusableInput(f"{out}: the output must not be one of the shards")
    warnings: list[str] = []
    runs, usable, indexes = [], [], []
    for shard in shard_paths:
        try:
            run = load_run(shard)
        except UnusableInput as error:
            warnings.append(f"skipped shard: {error}")
            continue
        warnings.extend(run.problems)
        indexes.append(len(runs))
        runs.append(run)
        usable.append(shard)
    if not runs:
        raise UnusableInput("no shard has usable results: " + "; ".join(warnings))
    rows, owners = merge_rows(runs, warnings)
    out.mkdir(parents=True, exist_ok=True)
    _write_results(rows, out / "results.csv")
    merge_junit(usable, out / "junit.xml", warnings, owners, indexes)
    _copy_identity(usable, out, warnings)
    merge_samples(usable, owners, out, warnings)
    plot_results(rows, out / "plots")
    merged = Run(out / "results.csv", rows, out, list(warnings))
    (out / REPORT_NAME).write_text(build_page(merged), encoding="utf-8")
    return warnings
