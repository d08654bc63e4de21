"""Tests for the reports package: CSV logging, summary, compare, plots, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reports import csv_log
from reports.__main__ import main
from reports.compare_markdown import compare
from reports.csv_log import PartWriter, merge_parts, read_rows
from reports.plots import plot_results
from reports.schema import CSV_COLUMNS
from reports.summary import format_summary, shorten_test_id

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_row(**overrides: object) -> dict[str, object]:
    """A plausible primary-metric row of a passed test."""
    row: dict[str, object] = {
        "run_id": "run1",
        "test_id": "benchmarks/test_eval.py::test_eval[tiny-w4-gptq-vqa]",
        "model": "tiny-vlm",
        "task": "vqa",
        "config": "w4-gptq",
        "method": "gptq",
        "w_bits": "vision=4,language=4",
        "config_hash": "abc123",
        "metric": "accuracy",
        "value": 70.0,
        "primary": True,
        "higher_is_better": True,
        "fp_value": 72.5,
        "delta": -2.5,
        "bpw": 4.25,
        "quant_seconds": 12.0,
        "eval_seconds": 30.5,
        "status": "passed",
    }
    row.update(overrides)
    return row


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    PartWriter(path).write_rows(rows)
    return path


# --- csv_log -----------------------------------------------------------------


def test_round_trip_spells_values_by_the_contract(tmp_path):
    path = write_csv(tmp_path / "part.csv", [make_row(higher_is_better=False, n_samples=None)])

    (row,) = read_rows(path)

    assert tuple(row) == CSV_COLUMNS
    assert row["primary"] == "true"
    assert row["higher_is_better"] == "false"
    assert row["value"] == "70.0"
    assert row["w_bits"] == "vision=4,language=4"  # the comma survives quoting
    assert row["n_samples"] == ""  # None
    assert row["peak_mem_mb"] == ""  # never given


def test_header_written_once_across_tests_and_parents_created(tmp_path):
    path = tmp_path / "parts" / "deep" / "results-gw0.csv"
    writer = PartWriter(path)
    writer.write_rows([make_row(metric="accuracy")])
    writer.write_rows([make_row(metric="anls", primary=False), make_row(metric="cider", primary=False)])

    text = path.read_text()
    assert text.count("run_id,commit,") == 1
    assert [row["metric"] for row in read_rows(path)] == ["accuracy", "anls", "cider"]


def test_unknown_column_rejected_before_anything_is_written(tmp_path):
    path = tmp_path / "part.csv"
    writer = PartWriter(path)
    writer.write_rows([make_row(metric="first")])

    with pytest.raises(ValueError, match="accuarcy"):
        writer.write_rows([make_row(metric="second"), make_row(accuarcy=1.0)])

    # The valid row of the rejected test must not have been appended alone.
    assert [row["metric"] for row in read_rows(path)] == ["first"]


def test_truncated_last_line_dropped_with_warning(tmp_path):
    path = write_csv(tmp_path / "part.csv", [make_row(metric="kept"), make_row(metric="torn")])
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"torn") + 2])  # killed mid-record

    with pytest.warns(UserWarning, match=r"part\.csv: line 3"):
        rows = read_rows(path)

    assert [row["metric"] for row in rows] == ["kept"]


def test_record_cut_inside_status_field_dropped(tmp_path):
    # Cut in the last field: the field count is still right, only status is broken.
    path = write_csv(tmp_path / "part.csv", [make_row(metric="kept"), make_row(metric="torn")])
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"passed") + 3])

    with pytest.warns(UserWarning, match="truncated"):
        rows = read_rows(path)

    assert [row["metric"] for row in rows] == ["kept"]


def test_writer_resumes_cleanly_after_a_torn_line(tmp_path):
    path = write_csv(tmp_path / "part.csv", [make_row(metric="kept"), make_row(metric="torn")])
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"torn")])

    PartWriter(path).write_rows([make_row(metric="after-restart")])

    with pytest.warns(UserWarning):
        rows = read_rows(path)
    assert [row["metric"] for row in rows] == ["kept", "after-restart"]


def test_read_rows_rejects_foreign_header_naming_the_path(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("name,score\nfoo,1\n")

    with pytest.raises(ValueError, match=r"other\.csv.*run_id"):
        read_rows(path)


def test_merge_concatenates_parts_in_order_and_replaces_old_file(tmp_path):
    part0 = write_csv(tmp_path / "parts" / "results-gw0.csv", [make_row(test_id="a"), make_row(test_id="b")])
    part1 = write_csv(tmp_path / "parts" / "results-gw1.csv", [make_row(test_id="c")])
    out = tmp_path / "results.csv"
    write_csv(out, [make_row(test_id="stale")])

    count = merge_parts([part1, part0], out)

    assert count == 3
    assert [row["test_id"] for row in read_rows(out)] == ["c", "a", "b"]


def test_merge_leaves_old_file_intact_when_replace_fails(tmp_path, monkeypatch):
    part = write_csv(tmp_path / "parts" / "results-gw0.csv", [make_row(test_id="new")])
    out = tmp_path / "results.csv"
    write_csv(out, [make_row(test_id="old")])
    before = out.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(csv_log.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        merge_parts([part], out)

    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts", "results.csv"]  # no temp left


# --- compare -----------------------------------------------------------------


def verdicts(markdown: str) -> list[str]:
    """The verdict cell of each table body line, in every section."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| config |")]
    return [line.rstrip(" |").rsplit("| ", 1)[-1] for line in lines]


def test_compare_flags_drop_beyond_tolerance():
    markdown, regressed = compare([make_row(value=70.0)], [make_row(value=68.5)], tolerance=1.0)

    assert regressed
    assert verdicts(markdown) == ["REGRESSION"]
    assert "-1.50" in markdown


def test_compare_accepts_drop_within_or_at_tolerance():
    for head_value in (69.5, 69.0):
        markdown, regressed = compare([make_row(value=70.0)], [make_row(value=head_value)], tolerance=1.0)
        assert not regressed
        assert verdicts(markdown) == ["ok"]


def test_compare_respects_lower_is_better():
    base = [make_row(metric="wer", value=10.0, higher_is_better=False)]

    _, rose = compare(base, [make_row(metric="wer", value=12.0, higher_is_better=False)])
    _, fell = compare(base, [make_row(metric="wer", value=5.0, higher_is_better=False)])

    assert rose
    assert not fell


def test_compare_reports_added_and_removed_without_failing():
    base = [make_row(config_hash="gone", config="w3-old")]
    head = [make_row(config_hash="fresh", config="w2-new", value=1.0)]

    markdown, regressed = compare(base, head)

    assert not regressed
    assert sorted(verdicts(markdown)) == ["added", "removed"]
    assert "w3-old" in markdown and "w2-new" in markdown


def test_compare_uses_last_of_repeated_rows_and_ignores_secondary_metrics():
    base = [make_row(value=70.0)]
    head = [
        make_row(value=50.0),  # an earlier, bad repetition
        make_row(value=70.0),
        make_row(metric="anls", primary=False, value=0.0),
    ]

    markdown, regressed = compare(base, head)

    assert not regressed
    assert verdicts(markdown) == ["ok"]


# --- CLI ---------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reports", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("head_value", "expected_code"), [(69.5, 0), (60.0, 1)])
def test_cli_compare_exit_code_reflects_regression(tmp_path, head_value, expected_code):
    base = write_csv(tmp_path / "base.csv", [make_row(value=70.0)])
    head = write_csv(tmp_path / "head.csv", [make_row(value=head_value)])

    result = run_cli("compare", str(base), str(head), "--tolerance", "1")

    assert result.returncode == expected_code, result.stderr
    assert "| config |" in result.stdout


@pytest.mark.parametrize("problem", ["foreign header", "missing file"])
def test_cli_compare_bad_input_exits_2_with_one_line(tmp_path, problem):
    good = write_csv(tmp_path / "base.csv", [make_row()])
    bad = tmp_path / "head.csv"
    if problem == "foreign header":
        bad.write_text("name,score\nfoo,1\n")

    result = run_cli("compare", str(good), str(bad))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "head.csv" in result.stderr


# --- summary -----------------------------------------------------------------


def test_summary_lists_primary_rows_with_signed_deltas(tmp_path):
    rows = read_rows(
        write_csv(
            tmp_path / "r.csv",
            [
                make_row(test_id="test_eval[w4]", value=69.3, delta=-3.2),
                make_row(test_id="test_eval[w4]", metric="secondary_metric", primary=False),
                make_row(test_id="test_eval[fp]", method="fp", value=72.5, delta=0.0),
            ],
        )
    )

    text = format_summary(rows)

    assert "test_eval[w4]" in text and "test_eval[fp]" in text
    assert "-3.20" in text and "+0.00" in text
    assert "69.30" in text
    assert "secondary_metric" not in text


def test_summary_of_nothing_says_so():
    assert format_summary([]) == "no results recorded"


def test_long_test_ids_keep_both_ends():
    test_id = "benchmarks/test_quantized_eval.py::test_eval[" + "x" * 80 + "-gptq-textvqa]"

    short = shorten_test_id(test_id, width=40)

    assert len(short) == 40
    assert short.startswith("benchmarks/")
    assert short.endswith("-gptq-textvqa]")


# --- plots -------------------------------------------------------------------


def test_plot_writes_one_png_per_model_and_task(tmp_path):
    rows = read_rows(
        write_csv(
            tmp_path / "r.csv",
            [
                make_row(model="org/tiny-vlm", method="fp", value=72.5, bpw=16),
                make_row(model="org/tiny-vlm", method="gptq", value=70.0, bpw=4.25),
                make_row(model="org/tiny-vlm", method="rtn", value=66.0, bpw=4.0),
                make_row(model="org/tiny-vlm", task="caption", value=1.0, bpw=""),  # unplottable
            ],
        )
    )

    paths = plot_results(rows, tmp_path / "plots")

    assert [path.name for path in paths] == ["org_tiny-vlm__vqa.png"]
    assert paths[0].read_bytes().startswith(PNG_MAGIC)


def test_cli_plot_prints_written_paths(tmp_path, capsys):
    results = write_csv(tmp_path / "r.csv", [make_row()])

    code = main(["plot", str(results), "--out", str(tmp_path / "plots")])

    assert code == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.read_bytes().startswith(PNG_MAGIC)


def test_same_values_lists_every_difference_by_test_and_metric():
    from reports.compare import same_values
    base = [{"test_id": "t[a]", "metric": "accuracy", "value": "50.0"}, {"test_id": "t[a]", "metric": "f1", "value": "1"}]
    head = [{"test_id": "t[a]", "metric": "accuracy", "value": "50.0"}, {"test_id": "t[a]", "metric": "f1", "value": "2"},
            {"test_id": "t[b]", "metric": "accuracy", "value": "3"}]
    assert same_values(base, base) == ("2 values in base, 2 in head: all identical.", True)
    report, identical = same_values(base, head)
    assert not identical
    assert "| t[a] | f1 | 1 | 2 |" in report and "| t[b] | accuracy | - | 3 |" in report
    assert "accuracy | 50.0" not in report


@pytest.mark.parametrize("head_change, reason", [
    ({"n_samples": 200}, "different samples (n 600 vs 200)"),
    ({"device": "cuda:0"}, "different device kinds (cpu vs cuda)"),
    ({"weights": "random-init"}, "random-init weights"),
])
def test_compare_never_calls_a_change_on_other_samples_devices_or_random_weights_a_regression(head_change, reason):
    """The same config measured on the full split and with --limit 200 (issue 12's example), on
    another device kind, or with random weights: a 2-point drop there is not a regression."""
    base = make_row(value=88.5, n_samples=600, device="cpu")
    head = make_row(value=86.1, **{"n_samples": 600, "device": "cpu", **head_change})
    markdown, regressed = compare([base], [head], tolerance=1.0)
    assert not regressed
    assert f"not comparable: {reason}" in markdown and "1 not comparable" in markdown
    same_device_kind = make_row(value=86.1, n_samples=600, device="cpu")
    assert compare([make_row(value=88.5, n_samples=600, device="cpu")], [same_device_kind])[1]
