"""--resume RUN_DIR: only the tests without a passed row run again, and the run dir ends with
every test once."""
import re
from collections import Counter

from reports.csv_log import read_rows
from tests.bench_run import SMALL_GRID, output, run_bench

FAILING = "llava-tiny-rtn-w8-all]"


def primary_rows(path):
    return [row for row in read_rows(path) if row["primary"] == "true" or not row["metric"]]


def test_resume_runs_only_what_did_not_pass_and_keeps_the_rest(tmp_path):
    report = tmp_path / "run"
    first = run_bench(*SMALL_GRID, f"--report-dir={report}", VQB_FAULT_FAIL_AT=FAILING)
    assert first.returncode == 1, output(first)
    before = {row["test_id"]: row for row in primary_rows(report / "results.csv")}
    assert len(before) == 6
    assert [t for t, row in before.items() if row["status"] != "passed"] == [
        f"benchmarks/test_vqav2.py::test_vqav2[{FAILING}"]

    again = run_bench(*SMALL_GRID, f"--resume={report}")
    assert again.returncode == 0, output(again)
    assert re.search(r"\b1 passed, \d+ deselected", again.stdout), output(again)
    after = primary_rows(report / "results.csv")
    assert Counter(row["test_id"] for row in after) == Counter(set(before))   # every test once
    assert {row["status"] for row in after} == {"passed"}
    for row in after:   # the old rows are the old rows; only the failed test has a new run id
        if FAILING in row["test_id"]:
            assert row["run_id"] != before[row["test_id"]]["run_id"]
        else:
            assert row == before[row["test_id"]]
    assert (report / "report.html").is_file()
    assert list(report.glob("junit-before.*.xml")) and (report / "junit.xml").is_file()

    nothing = run_bench(*SMALL_GRID, f"--resume={report}")
    assert nothing.returncode == 5 and re.search(r"\d+ deselected / 0 selected", nothing.stdout), output(nothing)
    assert Counter(row["test_id"] for row in primary_rows(report / "results.csv")) == Counter(set(before))


def test_resume_needs_a_run_dir_with_results(tmp_path):
    out = run_bench(*SMALL_GRID, f"--resume={tmp_path}")
    assert out.returncode == 4 and f"--resume {tmp_path}: nothing to resume" in out.stderr, output(out)
    clash = run_bench(*SMALL_GRID, f"--resume={tmp_path}", f"--report-dir={tmp_path / 'other'}")
    assert clash.returncode == 4 and "drop --report-dir" in clash.stderr, output(clash)
