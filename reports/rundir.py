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
      baselines/<model>--<task>.json   the FP result of (model, task) and the batch size every
                                       config of it uses, computed once per run by whichever
                                       worker needs it first (under a file lock)
      samples/<model>/<task>/<config>.jsonl   per-sample logs, written whole (temp + rename)
      plots/                           made from results.csv at session end

A new run clears parts/ and baselines/ (results.csv is replaced at its end); whatever a worker
wrote before dying stays readable in its part. A resumed run (--resume) keeps them: the previous
results.csv becomes a part, and only tests without a passed row run again.
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

from reports.csv_log import PartWriter, latest_attempts, read_parts, write_results

# A run writes CSV parts, per-sample logs, plots and an HTML page: far below this, but a disk
# this full would fail the run at its end, with hours of results unmerged.
MIN_FREE_BYTES = 64 * 2**20


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
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _write_atomic(self.root / ".run-owner.json", json.dumps(owner))

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

    def start(self, resume_id: str | None = None) -> None:
        """A new run forgets the previous run's parts and baselines. A resumed run (resume_id is
        its run id) keeps them, turns the previous results.csv into a part (it may come from
        `reports merge`, without parts) and moves the previous junit.xml aside."""
        if resume_id is None:
            for stale in ("parts", "baselines"):
                for path in (self.root / stale).glob("*"):
                    path.unlink()
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        if self.results_csv.exists():
            self.results_csv.replace(self.parts / f"results-before.{resume_id}.csv")
        if self.junit_xml.exists():
            self.junit_xml.replace(self.root / f"junit-before.{resume_id}.xml")

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
        """What every part holds, each test once (its latest attempt); damaged parts skipped."""
        rows, problems = read_parts(sorted(self.parts.glob("results-*.csv")))
        return MergedResults(latest_attempts(rows), problems)

    def merge(self) -> MergedResults | None:
        """Merge every part into results.csv; None when no part exists. A damaged part or record
        is skipped and named in the problems, never an exception: the other rows still count."""
        if not any(self.parts.glob("results-*.csv")):
            return None
        merged = self.recorded()
        write_results(merged.rows, self.results_csv)
        return merged

    def passed_keys(self) -> set[tuple[str, str, str]]:
        """(config_hash, model, task) of every test whose latest attempt here passed."""
        results = self.recorded()
        if self.results_csv.exists():     # a run dir made by `reports merge` has no parts
            rows, _problems = read_parts([self.results_csv])
            results.rows = latest_attempts(rows + results.rows)
        return {(row["config_hash"], row["model"], row["task"]) for row in results.rows if row["status"] == "passed"}

    # -- FP baselines shared by workers -----------------------------------------------------
    def baseline(self, model: str, task: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The stored baseline of (model, task), or compute() stored for the other workers."""
        path = self.root / "baselines" / f"{model}--{task}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.exists():
                return json.loads(path.read_text())
            result = compute()
            _write_atomic(path, json.dumps(result))
            return result

    # -- per-sample logs --------------------------------------------------------------------
    def samples_path(self, model: str, task: str, config: str) -> Path:
        return self.root / "samples" / model / task / f"{config}.jsonl"

    def write_samples(self, model: str, task: str, config: str, samples: Iterable[dict]) -> Path:
        path = self.samples_path(model, task, config)
        _write_atomic(path, "".join(json.dumps(sample) + "\n" for sample in samples))
        return path
