"""The run directory protocol, in one place: what a run writes where, and how workers share it.

    <run dir>/
      results.csv                      merged from parts/ at session end (atomic replace):
                                       each test once, its latest attempt
      junit.xml                        pytest's, with the properties the plugin records
      report.html                      the run's page (reports/html.py), made at session end
      parts/results-<worker>.csv       one CSV part per xdist worker ("main" without xdist, and
                                       the main process's rows for tests whose worker crashed),
                                       appended and synced after every test; a resumed run
                                       writes results-<worker>.<run id>.csv beside them
      .run.lock, .run-owner.json       held by the run writing here: a second run is refused
      run-identity.json                per task the split, data source and limit, per model its
                                       spec: what a --resume into this dir must match
      baselines/<model>--<task>.json   the FP result of (model, task) and the batch size every
                                       config of it uses, computed once per run by whichever
                                       worker needs it first (under a file lock)
      samples/<model>/<task>/<config>.jsonl   per-sample logs, written whole (temp + rename)
      plots/                           made from results.csv at session end

      previous/<run id>/               what an earlier run left here (its results.csv, junit.xml,
                                       report.html, parts/, baselines/, samples/, plots/), moved
                                       aside whole when a new run starts in the same dir: nothing
                                       of it is lost, and none of it passes for the new run's

Whatever a worker wrote before dying stays readable in its part. A resumed run (--resume) keeps
everything: the previous results.csv becomes a part, and only tests without a whole passed
record run again.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from filelock import FileLock, Timeout

from reports.csv_log import PartWriter, latest_attempts, read_parts, whole_attempts, write_results

# A run writes CSV parts, per-sample logs, plots and an HTML page: far below this, but a disk
# this full would fail the run at its end, with hours of results unmerged.
MIN_FREE_BYTES = 64 * 2**20


# What a run writes at the top of its dir: moved aside together when another run starts there.
RUN_OUTPUTS = ("results.csv", "junit.xml", "report.html", "junit-before.*.xml", "run-identity.json", "parts",
               "baselines", "samples", "plots")
PREVIOUS = "previous"


def _path_safe(text: str) -> str:
    """A run id as one path component (ids are ours, but a results.csv may come from anywhere)."""
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text).lstrip(".") or "run"


class RunDirError(Exception):
    """The run directory cannot be used (unwritable, full, in use, nothing to resume): one line
    that names it."""


@dataclass
class MergedResults:
    rows: list[dict[str, str]]
    problems: list[str] = field(default_factory=list)   # parts or records skipped, one line each


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class RunDir:
    def __init__(self, root: Path, part_tag: str = ""):
        self.root = Path(root)
        self.part_tag = part_tag          # set by a resumed run: its parts never mix with older ones
        self._lock: FileLock | None = None
        self._previous_run_id: str | None = None   # the run that held the dir before claim()

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def junit_xml(self) -> Path:
        return self.root / "junit.xml"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    # -- claiming the directory for one run -------------------------------------------------
    def check_writable(self) -> None:
        """Fail now, not at the session's end, when the directory cannot take a run's output."""
        probe = self.root / f".write-probe-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as handle:
                handle.write(b"\0" * 4096)
                handle.flush()
                os.fsync(handle.fileno())
            probe.unlink()
        except OSError as error:
            raise RunDirError(f"report dir {self.root} is not writable: {error.strerror or error}") from None
        free = shutil.disk_usage(self.root).free
        if free < MIN_FREE_BYTES:
            raise RunDirError(f"report dir {self.root}: only {free / 2**20:.1f} MiB free on its disk; a run "
                              f"needs at least {MIN_FREE_BYTES // 2**20} MiB")

    def claim(self, run_id: str) -> None:
        """Hold the directory for this process until release() or exit. The lock is an OS file
        lock (flock), so a run killed with SIGKILL leaves no stale lock behind."""
        lock = FileLock(str(self.root / ".run.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunDirError(f"report dir {self.root} is in use by another run ({self._owner()}); "
                              f"wait for it to finish or pass another --report-dir") from None
        self._lock = lock
        self._previous_run_id = self._owner_field("run_id")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_atomic(self.root / ".run-owner.json", json.dumps(owner))

    def _owner_field(self, name: str) -> str | None:
        try:
            return str(json.loads((self.root / ".run-owner.json").read_text())[name])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _owner(self) -> str:
        try:
            owner = json.loads((self.root / ".run-owner.json").read_text())
            return f"run {owner['run_id']}, pid {owner['pid']} on {owner['host']}, since {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its pid is not recorded yet"

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def start(self, resume_id: str | None = None) -> Path | None:
        """A new run moves what an earlier run left here to previous/<its run id>/ and returns
        that folder (None when there was nothing): otherwise a run stopped early would leave the
        old results.csv, report.html, plots and sample logs looking like its own. A resumed run
        (resume_id is its run id) keeps them, turns the previous results.csv into a part (it may
        come from `reports merge`, without parts) and moves the previous junit.xml aside."""
        if resume_id is None:
            return self._move_earlier_run_aside()
        self.parts.mkdir(parents=True, exist_ok=True)
        if self.results_csv.exists():
            self.results_csv.replace(self.parts / f"results-before.{resume_id}.csv")
        if self.junit_xml.exists():
            self.junit_xml.replace(self.root / f"junit-before.{resume_id}.xml")
        return None

    def _move_earlier_run_aside(self) -> Path | None:
        left = [path for name in RUN_OUTPUTS for path in sorted(self.root.glob(name))
                if not (path.is_dir() and not any(path.iterdir()))]
        if not left:
            return None
        label = self._previous_run_id or self._run_id_in_results() or \
            datetime.fromtimestamp(max(path.stat().st_mtime for path in left)).strftime("%Y%m%dT%H%M%S")
        target = self.root / PREVIOUS / _path_safe(label)
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.root / PREVIOUS / f"{_path_safe(label)}.{suffix}"
        target.mkdir(parents=True)
        for path in left:
            path.replace(target / path.name)
        return target

    def _run_id_in_results(self) -> str | None:
        """The run id in the earlier results.csv (or its first part): a dir written before run ids
        were kept in .run-owner.json, or one made by `reports merge`."""
        for source in [self.results_csv, *sorted(self.parts.glob("results-*.csv"))]:
            rows, _problems = read_parts([source]) if source.is_file() else ([], [])
            ids = sorted({row["run_id"] for row in rows} - {""})
            if ids:
                return ids[-1]
        return None

    # -- CSV parts --------------------------------------------------------------------------
    def part_path(self, worker: str) -> Path:
        return self.parts / (f"results-{worker}.{self.part_tag}.csv" if self.part_tag else f"results-{worker}.csv")

    def append_rows(self, worker: str, rows: Iterable[Mapping[str, object]]) -> None:
        PartWriter(self.part_path(worker)).write_rows(rows)

    # -- what each worker is running, for the main process when a worker dies -----------------
    def _running_path(self, worker: str) -> Path:
        return self.parts / f"running-{worker}.json"

    def mark_running(self, worker: str, test_id: str) -> None:
        _write_atomic(self._running_path(worker), json.dumps({"test_id": test_id}))

    def clear_running(self, worker: str) -> None:
        self._running_path(worker).unlink(missing_ok=True)

    def running(self, worker: str) -> str | None:
        """The test the worker had started and not finished (it died in it), if any."""
        try:
            return json.loads(self._running_path(worker).read_text())["test_id"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def crashed_tests(self, run_id: str) -> set[str]:
        """Tests recorded as crashed by this run (xdist would run a crashed test's group again)."""
        rows, _problems = read_parts(sorted(self.parts.glob("results-main*.csv")))
        return {row["test_id"] for row in rows if row["status"] == "crashed" and row["run_id"] == run_id}

    def recorded(self) -> MergedResults:
        """What every part holds, each test once (its latest whole attempt); damaged parts and
        torn attempts skipped and named in the problems."""
        rows, problems = read_parts(sorted(self.parts.glob("results-*.csv")))
        whole, torn = whole_attempts(rows)
        return MergedResults(latest_attempts(whole), problems + torn)

    def merge(self) -> MergedResults:
        """Merge every part into results.csv (only a header when no test finished). A damaged
        part, record or torn test is skipped and named in the problems, never an exception: the
        other rows still count."""
        merged = self.recorded()
        write_results(merged.rows, self.results_csv)
        return merged

    def passed_keys(self) -> set[tuple[str, str, str]]:
        """(config_hash, model, task) of every test whose latest whole attempt here passed."""
        rows, _problems = read_parts(sorted(self.parts.glob("results-*.csv")))
        if self.results_csv.exists():     # a run dir made by `reports merge` has no parts
            rows = read_parts([self.results_csv])[0] + rows
        whole, _torn = whole_attempts(rows)
        return {(row["config_hash"], row["model"], row["task"]) for row in latest_attempts(whole)
                if row["status"] == "passed"}

    # -- which samples the run measured, so that --resume never mixes them --------------------
    @property
    def identity_path(self) -> Path:
        return self.root / "run-identity.json"

    def write_identity(self, identity: Mapping[str, Any]) -> None:
        _write_atomic(self.identity_path, json.dumps(identity, indent=1, sort_keys=True))

    def check_resumable(self, identity: Mapping[str, Any]) -> None:
        """A resume needs earlier results, measured on the samples and models it would measure."""
        if not (self.results_csv.exists() or any(self.parts.glob("results-*.csv"))):
            raise RunDirError(f"--resume {self.root}: nothing to resume, no results.csv or parts/results-*.csv")
        conflicts = self.identity_conflicts(identity)
        if conflicts:
            shown = "; ".join(conflicts[:3]) + (f"; {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
            raise RunDirError(f"--resume {self.root}: this run would measure other samples or another model "
                              f"than that dir holds ({shown}); resume with the same options and "
                              f"grid, or start a new run in another --report-dir")

    def identity_conflicts(self, identity: Mapping[str, Any]) -> list[str]:
        """How a run that would measure `identity` differs from what this dir measured: its
        run-identity.json, or for a dir without one (made by `reports merge` before it copied
        that file, or by an older version) what its rows say. Empty: the two can be mixed."""
        rows, _problems = read_parts(sorted(self.parts.glob("results-*.csv")))
        if self.results_csv.exists():
            rows += read_parts([self.results_csv])[0]
        try:
            stored = json.loads(self.identity_path.read_text())
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict):
            return _row_conflicts(rows, identity)
        # Only what the dir measured matters: the grid's other tasks and models never ran here.
        measured = {"tasks": {row["task"] for row in rows}, "models": {row["model"] for row in rows}}
        return identity_differences(stored, identity, measured if rows else None)

    # -- FP baselines shared by workers -----------------------------------------------------
    def baseline(self, model: str, task: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The stored baseline of (model, task), or compute() stored for the other workers."""
        path = self._inside(self.root / "baselines" / f"{model}--{task}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.exists():
                return json.loads(path.read_text())
            result = compute()
            _write_atomic(path, json.dumps(result))
            return result

    # -- per-sample logs --------------------------------------------------------------------
    def samples_path(self, model: str, task: str, config: str) -> Path:
        return self._inside(self.root / "samples" / model / task / f"{config}.jsonl")

    def _inside(self, path: Path) -> Path:
        """Names are data: the grid checks them, and this refuses any that would still lead out."""
        if not path.resolve().is_relative_to(self.root.resolve()) or ".." in path.relative_to(self.root).parts:
            raise RunDirError(f"{path}: a model, task or config name would write outside the report dir {self.root}")
        return path

    def write_samples(self, model: str, task: str, config: str, samples: Iterable[dict]) -> Path:
        path = self.samples_path(model, task, config)
        _write_atomic(path, "".join(json.dumps(sample) + "\n" for sample in samples))
        return path


def identity_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any],
                         measured: Mapping[str, set] | None = None) -> list[str]:
    """One phrase per task or model that both name (and, given `measured`, that the dir has rows
    of) and that differs: '<section> <name>: <field> <stored> there, <wanted> now'. A task or
    model only one side has is no conflict (it is measured anew)."""
    found = []
    for section in ("tasks", "models"):
        before, now = stored.get(section) or {}, wanted.get(section) or {}
        names = set(before) & set(now)
        if measured is not None:
            names &= measured[section]
        for name in sorted(names):
            for key in sorted(set(before[name]) | set(now[name])):
                if before[name].get(key) != now[name].get(key):
                    found.append(f"{section[:-1]} {name}: {key} {_shown(before[name].get(key))} there, "
                                 f"{_shown(now[name].get(key))} now")
    return found


def _shown(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _row_conflicts(rows: list[dict[str, str]], identity: Mapping[str, Any]) -> list[str]:
    """identity_differences from a dir's rows alone: split, data source, and whether and how far
    the samples were limited (n_samples above the new limit, a limit on one side only)."""
    found: set[str] = set()
    tasks = identity.get("tasks") or {}
    for row in rows:
        now = tasks.get(row["task"])
        if now is None or not row["metric"]:
            continue
        task = f"task {row['task']}"
        if row["split"] and row["split"] != now.get("split"):
            found.add(f"{task}: split {row['split']} there, {now.get('split')} now")
        if row["data_source"] and row["data_source"] != now.get("data"):
            found.add(f"{task}: data {row['data_source']} there, {now.get('data')} now")
        limit, measured = now.get("limit"), row["n_samples"]
        if limit is None and row["sample_seed"]:
            found.add(f"{task}: a seeded subset of {measured} samples there, the whole split now")
        elif limit is not None and measured.isdigit() and int(measured) > limit:
            found.add(f"{task}: {measured} samples there, limit {limit} now")
        elif limit is not None and row["split"] and not row["sample_seed"]:
            found.add(f"{task}: the whole split there, limit {limit} now")
        elif limit is not None and (row["subset"] or "samples") != (now.get("subset") or "samples"):
            # Files written before the column drew every task's subset sample by sample.
            found.add(f"{task}: a subset drawn by {row['subset'] or 'samples'} there, "
                      f"by {now.get('subset') or 'samples'} now")
    return sorted(found)
