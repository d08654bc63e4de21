"""merge: shard run dirs joined into one, duplicates resolved by timestamp, damage skipped."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from reports.csv_log import PartWriter, read_rows
from reports.merge import merge_runs
from tests.test_reports import make_row
from tests.test_reports_compare import run_cli


def junit(names: list[str], failures: int = 0) -> str:
    """A pytest junit.xml with one testcase per name (classname b, as the rows' test_id b.py::name)."""
    cases = "".join(f'<testcase classname="b" name="{name}" time="1.0"/>' for name in names)
    return (f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{len(names)}" failures="{failures}" '
            f'errors="0" skipped="0" time="{len(names)}.5">{cases}</testsuite></testsuites>')


def make_shard(root: Path, configs: dict[str, tuple[float, str]]) -> Path:
    """A shard run dir: a vqav2 test per config (value, timestamp), its samples and junit.xml."""
    rows = [make_row(model="llava-tiny", task="vqav2", config=config, config_hash=f"h-{config}", value=value,
                     timestamp=timestamp, test_id=f"b.py::t[{config}]") for config, (value, timestamp) in configs.items()]
    PartWriter(root / "results.csv").write_rows(rows)
    for config, (value, _timestamp) in configs.items():
        log = root / "samples" / "llava-tiny" / "vqav2" / f"{config}.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps({"question_id": 1, "score": value / 100, "from": str(root.name)}) + "\n")
    (root / "junit.xml").write_text(junit([f"t[{config}]" for config in configs]))
    return root


def test_merge_joins_shards_and_keeps_the_latest_repeat(tmp_path):
    first = make_shard(tmp_path / "s1", {"rtn": (90.0, "2026-01-01T10:00:00+00:00"),
                                         "awq": (80.0, "2026-01-01T12:00:00+00:00")})
    second = make_shard(tmp_path / "s2", {"gptq": (93.0, "2026-01-01T10:00:00+00:00"),
                                          "awq": (70.0, "2026-01-01T11:00:00+00:00")})   # older repeat

    warnings = merge_runs(tmp_path / "out", [first, second])

    rows = read_rows(tmp_path / "out" / "results.csv")
    assert sorted((row["config"], row["value"]) for row in rows) == [("awq", "80.0"), ("gptq", "93.0"), ("rtn", "90.0")]
    assert len(warnings) == 1 and "t[awq]" in warnings[0] and "s1" in warnings[0]
    suites = ElementTree.parse(tmp_path / "out" / "junit.xml").getroot()
    # t[awq] ran on both shards: one testcase, the one of the shard whose rows were kept (s1)
    assert suites.tag == "testsuites" and suites.get("tests") == "3" and len(suites.findall("testsuite")) == 2
    assert [len(suite.findall("testcase")) for suite in suites.findall("testsuite")] == [2, 1]
    logs = sorted(p.name for p in (tmp_path / "out" / "samples" / "llava-tiny" / "vqav2").iterdir())
    assert logs == ["awq.jsonl", "gptq.jsonl", "rtn.jsonl"]
    awq = json.loads((tmp_path / "out" / "samples" / "llava-tiny" / "vqav2" / "awq.jsonl").read_text())
    assert awq["from"] == "s1"   # the log of the shard whose row was kept
    assert (tmp_path / "out" / "report.html").read_text().count("data:image/png;base64,") >= 1


def test_damaged_shards_are_warnings_and_the_rest_is_merged(tmp_path):
    good = make_shard(tmp_path / "good", {"rtn": (90.0, "2026-01-01T10:00:00+00:00")})
    torn = make_shard(tmp_path / "torn", {"gptq": (93.0, "2026-01-01T10:00:00+00:00"),
                                          "awq": (94.0, "2026-01-01T10:00:00+00:00")})
    csv_text = (torn / "results.csv").read_text()
    (torn / "results.csv").write_text(csv_text[:-30])                   # last record cut
    (torn / "junit.xml").write_text("<testsuites><testsuite")            # cut XML
    log = torn / "samples" / "llava-tiny" / "vqav2" / "gptq.jsonl"
    log.write_text(log.read_text() + '{"question_id": 2, "sco')         # cut JSONL line
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "results.csv").write_bytes(b"\x00\xff not a csv")

    result = run_cli("merge", str(tmp_path / "out"), str(good), str(torn), str(garbage))

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = result.stderr.splitlines()
    assert all(line.startswith("warning: ") for line in warnings)
    assert any("dropping record" in line for line in warnings)
    assert any("junit.xml: skipped, not well-formed XML" in line for line in warnings)
    assert any("gptq.jsonl: line 2: skipped, not JSON" in line for line in warnings)
    assert any("skipped shard" in line and "garbage" in line for line in warnings)
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert sorted(row["config"] for row in rows) == ["gptq", "rtn"]
    merged_log = (tmp_path / "out" / "samples" / "llava-tiny" / "vqav2" / "gptq.jsonl").read_text()
    assert [json.loads(line)["question_id"] for line in merged_log.splitlines()] == [1]
    assert ElementTree.parse(tmp_path / "out" / "junit.xml").getroot().get("tests") == "1"


def test_nothing_usable_or_output_among_shards_exits_2_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shard = make_shard(tmp_path / "s", {"rtn": (90.0, "2026-01-01T10:00:00+00:00")})

    for args, named in (([str(tmp_path / "out"), str(empty)], "empty"), ([str(shard), str(shard)], "output")):
        result = run_cli("merge", *args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
        assert named in result.stderr


# -- issue 21: a damaged results.csv is rebuilt from parts/; no JUnit testcase twice -------------
def test_a_shard_with_a_damaged_results_csv_is_rebuilt_from_its_parts(tmp_path):
    shard = make_shard(tmp_path / "s1", {"rtn": (90.0, "2026-01-01T10:00:00+00:00"),
                                         "awq": (80.0, "2026-01-01T10:00:01+00:00")})
    (shard / "parts").mkdir()
    (shard / "results.csv").replace(shard / "parts" / "results-main.csv")
    (shard / "results.csv").write_bytes(b"\x00\xff garbage, not the merged file")
    other = make_shard(tmp_path / "s2", {"gptq": (93.0, "2026-01-01T10:00:00+00:00")})

    warnings = merge_runs(tmp_path / "out", [shard, other])

    assert sorted(row["config"] for row in read_rows(tmp_path / "out" / "results.csv")) == ["awq", "gptq", "rtn"]
    assert any("results.csv damaged" in warning and "rebuilt from parts/" in warning for warning in warnings)


def test_merging_a_shard_twice_lists_each_testcase_once(tmp_path):
    shard = make_shard(tmp_path / "s1", {"rtn": (90.0, "2026-01-01T10:00:00+00:00"),
                                         "awq": (80.0, "2026-01-01T10:00:01+00:00")})
    merge_runs(tmp_path / "out", [shard, shard])
    suites = ElementTree.parse(tmp_path / "out" / "junit.xml").getroot()
    names = [case.get("name") for case in suites.iter("testcase")]
    assert sorted(names) == ["t[awq]", "t[rtn]"] and suites.get("tests") == "2", ElementTree.tostring(suites)
    assert sum(int(suite.get("tests")) for suite in suites.findall("testsuite")) == 2
