"""The run directory protocol, in one place: what a run writes where, and how workers share it.

    <run dir>/
      results.csv                      merged from parts/ at session end (atomic replace)
      junit.xml                        pytest's, with the properties the plugin records
      parts/results-<worker>.csv       one CSV part per xdist worker ("main" without xdist),
                                       appended and synced after every test
      baselines/<model>--<task>.json   the FP result of (model, task), computed once per run by
                                       whichever worker needs it first (under a file lock)
      samples/<model>/<task>/<config>.jsonl   per-sample logs, written whole (temp + rename)
      plots/                           made from results.csv at session end

A new run clears parts/ and baselines/ (results.csv is replaced at its end); whatever a worker
wrote before dying stays readable in its part.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from filelock import FileLock

from reports.csv_log import PartWriter, merge_parts, read_rows


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class RunDir:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def junit_xml(self) -> Path:
        return self.root / "junit.xml"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def start(self) -> None:
        """A new run: forget the previous run's parts and baselines."""
        for stale in ("parts", "baselines"):
            for path in (self.root / stale).glob("*"):
                path.unlink()

    # -- CSV parts --------------------------------------------------------------------------
    def append_rows(self, worker: str, rows: Iterable[Mapping[str, object]]) -> None:
        PartWriter(self.root / "parts" / f"results-{worker}.csv").write_rows(rows)

    def merge(self) -> list[dict[str, str]] | None:
        """Merge every part into results.csv; its rows, or None when no test wrote any."""
        parts = sorted((self.root / "parts").glob("results-*.csv"))
        if not parts:
            return None
        merge_parts(parts, self.results_csv)
        return read_rows(self.results_csv)

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
