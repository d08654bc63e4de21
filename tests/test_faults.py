"""Faults a nightly grid must survive: a killed worker, Ctrl-C (also inside COCO's METEOR), SIGTERM,
two runs on one report dir, a used report dir, an unusable report dir, damaged CSV parts, tests
torn while written. Each end-to-end test runs the real suite on the embedded world."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections import Counter

import psutil
import pytest

from reports import rundir as rundir_module
from reports.csv_log import read_rows
from reports.rundir import RunDir, RunDirError
from reports.schema import CSV_COLUMNS
from tests.bench_run import ROOT, SMALL_GRID, output, run_bench

# The first test each of the two workers gets (grid.schedule_order): whichever worker gets KILLED
# dies in it; the other holds HELD until the replacement has joined, which leaves work for the
# replacement (tests/fault_hooks.py says why that takes a hold). One worker only: two killed at
# once end, now and then, in an INTERNALERROR of xdist 3.8.0 (KeyError: <WorkerController gw3>):
# its scheduler still counts the dead workers' collections, so the first replacement to collect
# has it hand work to the second, which has not collected yet.
KILLED, HELD = "llava-tiny-rtn-w4-all]", "llava-tiny-rtn-w4g32-all]"


def test_killed_worker_loses_only_its_test_and_is_replaced(tmp_path):
    report = tmp_path / "run"
    # `--report-dir DIR` with a space, as people type it: replacement workers start after DIR
    # exists, which used to make their command line unparsable ("unrecognized arguments").
    out = run_bench(*SMALL_GRID, "-n", "2", "--report-dir", str(report), VQB_FAULT_KILL_AT=KILLED,
                    VQB_FAULT_HOLD_AT=HELD)
    text = out.stdout + out.stderr
    assert out.returncode == 1, output(out)
    assert "unrecognized arguments" not in text and "INTERNALERROR" not in text, output(out)
    replaced = re.findall(r"replacing crashed worker (gw\d+)", text)
    assert len(replaced) == 1 and replaced[0] in ("gw0", "gw1"), output(out)
    killed_worker = replaced[0]
    survivor, replacement = {"gw0": "gw1", "gw1": "gw0"}[killed_worker], "gw2"
    assert f"{killed_worker!r} crashed while running 'benchmarks/test_vqav2.py::test_vqav2[{KILLED}" in text, output(out)
    # xdist hands the crashed test to another worker: it is skipped there, not run again.
    assert "1 failed, 5 passed, 1 skipped" in out.stdout, output(out)

    for part in (report / "parts").glob("*.csv"):      # nothing half-written in any part
        with open(part, newline="") as handle:
            records = list(csv.reader(handle))
        assert records[0] == list(CSV_COLUMNS) and all(len(r) == len(CSV_COLUMNS) for r in records), part
    rows = read_rows(report / "results.csv")
    tests = Counter(row["test_id"] for row in rows if row["primary"] == "true" or row["status"] == "crashed")
    assert len(tests) == 6 and set(tests.values()) == {1}, tests           # each test once
    status = {row["test_id"].split("[")[1]: (row["status"], row["worker"]) for row in rows}
    assert status.pop(KILLED) == ("crashed", killed_worker)
    assert {state for state, _ in status.values()} == {"passed"}
    # The survivor went on, and the replacement ran tests too.
    assert {worker for _, worker in status.values()} == {survivor, replacement}, status
    # What --resume would run again: exactly the crashed test.
    assert len(RunDir(report).passed_keys()) == 5


def test_ctrl_c_leaves_a_valid_results_csv_of_what_finished(tmp_path):
    report = tmp_path / "run"
    out = run_bench(*SMALL_GRID, f"--report-dir={report}", "-k", "w4", VQB_FAULT_INTERRUPT_AT="rtn-w4-language")
    assert out.returncode == 2, output(out)          # pytest's "interrupted"
    with _no_warnings():
        rows = read_rows(report / "results.csv")
    finished = {row["test_id"] for row in rows}
    assert finished and all(row["status"] == "passed" for row in rows)
    assert not any("rtn-w4-language" in test for test in finished)
    assert len(finished) < 4                          # the interrupted one and what followed never ran
    assert (report / "report.html").is_file()


class _no_warnings:
    """A damaged CSV would make read_rows warn; a clean one must not."""
    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        assert not [str(w.message) for w in self._caught]


def test_second_run_on_a_busy_report_dir_is_refused_naming_the_other_run(tmp_path):
    busy = RunDir(tmp_path / "run")
    busy.check_writable()
    busy.claim("other-run")       # this process stands for the run already writing there
    try:
        out = run_bench(*SMALL_GRID, f"--report-dir={tmp_path / 'run'}")
    finally:
        busy.release()
    assert out.returncode == 4, output(out)
    assert "is in use by another run (run other-run, pid" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "results.csv").exists()


def test_unwritable_report_dir_is_one_usage_error_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = run_bench(*SMALL_GRID, f"--report-dir={blocker / 'run'}")
    assert out.returncode == 4, output(out)
    assert f"report dir {blocker / 'run'} is not writable" in out.stderr and "Traceback" not in out.stderr
    assert "passed" not in out.stdout


def test_full_disk_is_refused_before_any_test(tmp_path, monkeypatch):
    class Usage:
        free = 3 * 2**20
    monkeypatch.setattr(rundir_module.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(RunDirError, match=r"only 3\.0 MiB free on its disk; a run needs at least 64 MiB"):
        RunDir(tmp_path / "run").check_writable()


def _write_part(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_session_end_merge_skips_damaged_parts_and_says_so(tmp_path):
    """A run whose parts include garbage, a foreign CSV and a torn record still merges the rest."""
    first = tmp_path / "first"
    out = run_bench(*SMALL_GRID, f"--report-dir={first}", "-k", "rtn-w8-all")
    assert out.returncode == 0, output(out)
    run = tmp_path / "run"
    shutil.copytree(first, run)
    (run / "results.csv").unlink()
    parts = run / "parts"
    (parts / "results-gw7.csv").write_bytes(b"\x00\xff\xfe garbage \x00")
    (parts / "results-gw8.csv").write_text("name,score\nfoo,1\n")
    good = read_rows(parts / "results-main.csv")
    torn = dict(good[0], test_id="benchmarks/test_vqav2.py::test_vqav2[llava-tiny-torn]", config_hash="feed")
    _write_part(parts / "results-gw9.csv", [torn])
    (parts / "results-gw9.csv").write_text((parts / "results-gw9.csv").read_text()[:-30])
    # Nothing left to run: the session end merges what the parts hold.
    out = run_bench(*SMALL_GRID, f"--resume={run}", "-k", "rtn-w8-all")
    assert out.returncode in (0, 5), output(out)
    assert "Traceback" not in out.stdout + out.stderr
    summary = out.stdout
    assert "results-gw7.csv: part skipped" in summary and "results-gw8.csv: part skipped" in summary
    assert "results-gw9.csv: line" in summary and "dropping record" in summary
    assert [row["test_id"] for row in read_rows(run / "results.csv")] == [row["test_id"] for row in good]


def test_merge_keeps_the_latest_attempt_of_each_test(tmp_path):
    run = RunDir(tmp_path)
    base = {column: "" for column in CSV_COLUMNS}
    first = dict(base, run_id="r1", timestamp="2026-01-01T00:00:01", test_id="t", config_hash="h", metric="m",
                 primary="true", status="failed", worker="gw0", value="1")
    crash = dict(base, run_id="r1", timestamp="2026-01-01T00:00:02", test_id="u", config_hash="h", status="crashed",
                 worker="gw1")
    other = dict(first, test_id="v", status="passed")
    _write_part(tmp_path / "parts" / "results-gw0.csv", [first, other])
    _write_part(tmp_path / "parts" / "results-main.csv", [crash])
    again = dict(first, run_id="r2", timestamp="2026-01-01T01:00:00", status="passed", value="2")
    again_crash = dict(crash, run_id="r2", timestamp="2026-01-01T01:00:01", status="passed", metric="m", primary="true",
                       value="3")
    _write_part(tmp_path / "parts" / "results-gw0.r2.csv", [again, again_crash])
    merged = run.merge()
    assert not merged.problems
    got = {(row["test_id"], row["run_id"], row["status"], row["value"]) for row in read_rows(tmp_path / "results.csv")}
    assert got == {("t", "r2", "passed", "2"), ("u", "r2", "passed", "3"), ("v", "r1", "passed", "1")}
    assert run.passed_keys() == {("h", "", "")}


# -- stop signals (issue 21) ---------------------------------------------------------------------
def _run_in_own_session(*args, timeout=150, **fault_env):
    """run_bench in a session of its own, so that every process it starts (xdist workers, Java)
    can be found afterwards and nothing outlives a hung run: (result, the session's id, seconds
    from the start to the exit)."""
    env = {**os.environ, **fault_env}
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "tests.fault_hooks", *args], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the run did not end within {timeout} s (hung)\n{stdout[-3000:]}\n{stderr[-3000:]}")
    ended = time.time()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), process.pid, ended


def _alive_in_session(session: int) -> list[str]:
    """Processes still running in the session (zombies excluded), as 'pid name'."""
    found = []
    for process in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getsid(process.pid) == session and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {process.info['name']}")
        except (ProcessLookupError, PermissionError):
            continue
    return found


def _end_session(session: int) -> None:
    try:
        os.killpg(session, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_ctrl_c_in_meteor_scoring_ends_the_run_in_seconds_and_kills_java(tmp_path):
    """Ctrl-C while METEOR's Java child scored used to hang until a second Ctrl-C, the child
    alive: pycocoevalcap's Meteor.__del__ waited on the lock its interrupted compute_score held."""
    report, log = tmp_path / "run", tmp_path / "signal.json"
    # vqav2 under rtn-w8-all first (its group is costlier), then COCO's FP test, stopped in METEOR.
    out, session, ended = _run_in_own_session(
        "-k", "(llava-tiny-rtn-w8-all and vqav2) or (llava-tiny-fp16 and coco_caption)", "--limit", "4",
        f"--report-dir={report}", VQB_FAULT_SIGNAL_IN_METEOR="INT", VQB_FAULT_SIGNAL_LOG=str(log))
    try:
        assert out.returncode == 2, output(out)               # pytest's "interrupted"
        sent = json.loads(log.read_text())
        assert ended - sent["sent"] < 20, f"{ended - sent['sent']:.1f} s from Ctrl-C to the end"
        time.sleep(0.5)
        assert not psutil.pid_exists(sent["java_pid"]) or \
            psutil.Process(sent["java_pid"]).status() == psutil.STATUS_ZOMBIE, "METEOR's Java child outlived the run"
        assert not _alive_in_session(session), _alive_in_session(session)
    finally:
        _end_session(session)
    rows = read_rows(report / "results.csv")
    assert {row["test_id"].split("::")[1] for row in rows} == {"test_vqav2[llava-tiny-rtn-w8-all]"}
    assert {row["status"] for row in rows} == {"passed"}
    assert ElementTree.parse(report / "junit.xml").getroot() is not None and (report / "report.html").is_file()


def _earlier_run(report):
    """A report dir as an earlier run (id old-run) left it: results, page, a log and a plot."""
    old_row = {column: "" for column in CSV_COLUMNS} | {
        "run_id": "old-run", "test_id": "benchmarks/test_vqav2.py::test_vqav2[llava-tiny-gone]", "model": "llava-tiny",
        "task": "vqav2", "config": "gone", "metric": "accuracy", "value": "50.0", "primary": "true", "status": "passed"}
    _write_part(report / "results.csv", [old_row])
    (report / "report.html").write_text("<html>old-run</html>")
    (report / "samples" / "llava-tiny" / "vqav2").mkdir(parents=True)
    (report / "samples" / "llava-tiny" / "vqav2" / "gone.jsonl").write_text("{}\n")
    (report / "plots").mkdir()
    (report / "plots" / "llava-tiny__old.png").write_bytes(b"png")
    (report / ".run-owner.json").write_text(json.dumps({"run_id": "old-run", "pid": 1, "host": "h", "started": "t"}))


def test_sigterm_leaves_results_junit_and_report_and_moves_an_earlier_run_aside(tmp_path):
    """SIGTERM (scancel, a CI cancellation) used to end the process on the spot: only parts/
    stayed, beside the earlier run's results.csv and report.html, which then read as this run's."""
    report = tmp_path / "run"
    _earlier_run(report)
    out = run_bench(*SMALL_GRID, f"--report-dir={report}", "-k", "rtn-w4-all or rtn-w8-all",
                    VQB_FAULT_SIGNAL_AT="TERM:rtn-w8-all]")
    assert out.returncode == 2, output(out)
    assert f"moved to {report / 'previous' / 'old-run'}" in out.stdout, output(out)
    rows = read_rows(report / "results.csv")
    assert {row["test_id"].split("::")[1] for row in rows} == {"test_vqav2[llava-tiny-rtn-w4-all]"}
    assert {row["run_id"] for row in rows} != {"old-run"} and {row["status"] for row in rows} == {"passed"}
    cases = ElementTree.parse(report / "junit.xml").getroot().iter("testcase")
    assert "test_vqav2[llava-tiny-rtn-w4-all]" in {case.get("name") for case in cases}
    assert (report / "report.html").is_file() and "old-run" not in (report / "report.html").read_text()
    # The earlier run is kept whole, aside; nothing of it is left among this run's files.
    previous = report / "previous" / "old-run"
    assert read_rows(previous / "results.csv")[0]["run_id"] == "old-run"
    assert (previous / "report.html").read_text() == "<html>old-run</html>"
    assert (previous / "samples" / "llava-tiny" / "vqav2" / "gone.jsonl").is_file()
    assert (previous / "plots" / "llava-tiny__old.png").is_file()
    assert not (report / "samples" / "llava-tiny" / "vqav2" / "gone.jsonl").exists()
    assert not (report / "plots" / "llava-tiny__old.png").exists()
    # Each test's rows were written in one append that ends with its primary row.
    part = read_rows(report / "parts" / "results-main.csv")
    assert part and part[-1]["primary"] == "true" and [row["primary"] for row in part].count("true") == 1


def test_a_test_cut_between_its_rows_is_not_passed_and_not_merged(tmp_path):
    """COCO's rows cut after ROUGE_L, before CIDEr (its primary): --resume used to count the test
    as passed and never run it again, and results.csv held it without its primary metric."""
    base = {column: "" for column in CSV_COLUMNS} | {
        "run_id": "r1", "timestamp": "2026-01-01T00:00:01", "config_hash": "h", "model": "llava-tiny",
        "status": "passed", "worker": "main"}
    coco = "benchmarks/test_coco_caption.py::test_coco_caption[llava-tiny-fp16]"
    cut = [dict(base, test_id=coco, task="coco_caption", metric=metric, value="0.5", primary="false")
           for metric in ("Bleu_4", "METEOR", "ROUGE_L")]                       # CIDEr never written
    whole = [dict(base, test_id="benchmarks/test_vqav2.py::test_vqav2[llava-tiny-fp16]", task="vqav2",
                  metric="accuracy", value="93.0", primary="true")]
    _write_part(tmp_path / "parts" / "results-main.csv", whole + cut)
    run = RunDir(tmp_path)
    assert run.passed_keys() == {("h", "llava-tiny", "vqav2")}
    merged = run.merge()
    assert [row["task"] for row in read_rows(tmp_path / "results.csv")] == ["vqav2"]
    assert any(coco in problem and "not its primary one" in problem for problem in merged.problems), merged.problems


def test_cache_entries_written_behind_are_whole_on_disk_when_a_run_ends(tmp_path):
    """Entries are written behind the run (quantizers/cache.py): on a slow disk the write is still
    under way when its test ends. A run stopped by SIGTERM in that test, and a run over two
    workers, leave every entry they built on disk, whole (each loads and passes its checksum)."""
    from quantizers.cache import QuantCache

    cache = tmp_path / "cache"
    grid = ("-m", "gptq and vqav2 and llava-tiny", "--limit", "20", f"--cache-dir={cache}")

    def entries() -> list:
        keys = sorted(path.stem for path in (cache / "quantized").rglob("*.safetensors"))
        return [QuantCache(cache).load(key) for key in keys]

    out = run_bench(*grid, "-k", "gptq-w4-all", f"--report-dir={tmp_path / 'stopped'}",
                    VQB_FAULT_SLOW_CACHE_WRITE="3", VQB_FAULT_SIGNAL_AT="TERM:gptq-w4-all]")
    assert out.returncode == 2, output(out)
    first = entries()
    assert len(first) == 1 and first[0] is not None, output(out)
    out = run_bench(*grid, "-n", "2", f"--report-dir={tmp_path / 'workers'}", VQB_FAULT_SLOW_CACHE_WRITE="3")
    assert out.returncode == 0, output(out)
    every = entries()
    assert len(every) == 3 and all(entry is not None for entry in every), output(out)
