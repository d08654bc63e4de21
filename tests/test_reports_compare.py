"""compare across commits: comparability, the paired bootstrap, markdown sections, exit codes
and damaged inputs. Run dirs are built synthetically: a results.csv and per-sample logs in the
layout of reports/rundir.py, for a registered task with a per-sample score (vqav2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reports.compare import compare_runs
from reports.compare_markdown import compare, format_markdown
from reports.csv_log import PartWriter
from reports.paired import PairedInterval, SampleScores, paired_bootstrap
from reports.runs import load_run
from tests.test_reports import make_row, verdicts

REPO_ROOT = Path(__file__).resolve().parents[1]


def vqa_scores(n: int, accuracy: float, seed: int) -> list[float]:
    """n VQA per-sample scores (0 or 1) whose mean is exactly round(accuracy * n) / n."""
    hits = round(accuracy * n)
    scores = [1.0] * hits + [0.0] * (n - hits)
    np.random.default_rng(seed).shuffle(scores)
    return scores


def make_run(root: Path, configs: dict[str, list[float]], n_samples: int | None = None, first_id: int = 0,
             **row_overrides) -> Path:
    """A run dir: one llava-tiny vqav2 test per config, its accuracy the mean of its sample scores."""
    rows = []
    for config, scores in configs.items():
        value = 100 * sum(scores) / len(scores)
        rows.append(make_row(model="llava-tiny", task="vqav2", config=config, config_hash=f"hash-{config}",
                             test_id=f"benchmarks/test_vqav2.py::test_vqav2[llava-tiny-{config}]",
                             value=value, n_samples=n_samples or len(scores), device="cpu", **row_overrides))
        log = root / "samples" / "llava-tiny" / "vqav2" / f"{config}.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps({"question_id": first_id + i, "prediction": "x", "score": score}) + "\n"
                               for i, score in enumerate(scores)))
    PartWriter(root / "results.csv").write_rows(rows)
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reports", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180)


def section_of(markdown: str, config: str) -> str:
    """The '#### ...' heading above the first table line naming config."""
    heading = ""
    for line in markdown.splitlines():
        if line.startswith("#### ") or line.startswith("<details>"):
            heading = line
        elif line.startswith(f"| {config} |"):
            return heading
    raise AssertionError(f"{config} not in any table:\n{markdown}")


def test_issue_12_full_run_against_limit_200_is_not_comparable_and_exits_0(tmp_path):
    """Two runs of one commit, one on the full split and one with --limit 200: every config is
    'not comparable', even where the smaller subset scored lower."""
    full = make_run(tmp_path / "full", {"rtn-w4-all": vqa_scores(600, 0.92, 0), "fp16": vqa_scores(600, 0.95, 1)})
    limited = make_run(tmp_path / "l200", {"rtn-w4-all": vqa_scores(200, 0.85, 2), "fp16": vqa_scores(200, 0.95, 3)})

    result = run_cli("compare", str(full), str(limited))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 not comparable" in result.stdout
    assert verdicts(result.stdout) == ["not comparable: different samples (n 600 vs 200)"] * 2
    assert "Regressions" not in result.stdout


def test_worse_config_beyond_tolerance_and_noise_exits_1_naming_it(tmp_path):
    scores = vqa_scores(400, 0.92, 0)
    worse = list(scores)
    for index in [i for i, score in enumerate(worse) if score == 1.0][:40]:   # 10 points lost, paired
        worse[index] = 0.0
    base = make_run(tmp_path / "base", {"rtn-w4-all": scores, "gptq-w4-all": scores})
    head = make_run(tmp_path / "head", {"rtn-w4-all": worse, "gptq-w4-all": scores})

    result = run_cli("compare", str(base), str(head), "--tolerance", "1")

    assert result.returncode == 1, result.stdout + result.stderr
    assert section_of(result.stdout, "rtn-w4-all").startswith("#### Regressions")
    assert section_of(result.stdout, "gptq-w4-all").startswith("<details><summary>Unchanged")
    line = next(line for line in result.stdout.splitlines() if line.startswith("| rtn-w4-all |"))
    assert "-10.00" in line and "REGRESSION" in line
    low, high = (float(text) for text in line.split("[")[1].split("]")[0].split(","))
    assert low <= -10.0 <= high < 0   # the interval holds the paired change and excludes zero


def test_drop_beyond_tolerance_within_noise_is_not_a_regression(tmp_path):
    """30 samples, 2 of them flipped each way and one more lost: -3.3 points, far beyond a
    tolerance of 1, but the paired interval still holds zero."""
    scores = [1.0, 0.0] * 15
    head_scores = list(scores)
    head_scores[0], head_scores[1], head_scores[2], head_scores[3], head_scores[4] = 0.0, 1.0, 0.0, 1.0, 0.0
    base = make_run(tmp_path / "base", {"rtn-w4-all": scores})
    head = make_run(tmp_path / "head", {"rtn-w4-all": head_scores})

    comparison = compare_runs(load_run(base), load_run(head), tolerance=1.0)

    (finding,) = comparison.findings
    assert finding.change == pytest.approx(-100 / 30)
    assert finding.verdict == "ok" and "within noise" in finding.reason
    assert finding.interval.low < 0 < finding.interval.high
    assert not comparison.regressed


def test_csv_inputs_fall_back_to_the_tolerance_and_say_so(tmp_path):
    base = make_run(tmp_path / "base", {"rtn-w4-all": vqa_scores(100, 0.9, 0)})
    head = make_run(tmp_path / "head", {"rtn-w4-all": vqa_scores(100, 0.8, 0)})

    result = run_cli("compare", str(base / "results.csv"), str(head / "results.csv"))

    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("| rtn-w4-all |"))
    assert "tolerance only" in line
    assert "judged on the tolerance alone" in result.stdout and "not a run dir" in result.stdout


def test_sections_come_in_reading_order():
    base = [make_row(config="down", config_hash="d", value=70.0), make_row(config="up", config_hash="u", value=60.0),
            make_row(config="other-n", config_hash="n", value=60.0, n_samples=100),
            make_row(config="gone", config_hash="g"), make_row(config="same", config_hash="s")]
    head = [make_row(config="down", config_hash="d", value=60.0), make_row(config="up", config_hash="u", value=70.0),
            make_row(config="other-n", config_hash="n", value=50.0, n_samples=50),
            make_row(config="fresh", config_hash="f"), make_row(config="same", config_hash="s")]

    markdown, regressed = compare(base, head)

    assert regressed
    headings = [line for line in markdown.splitlines() if line.startswith(("#### ", "<details>"))]
    assert headings == ["#### Regressions (1)", "#### Improvements (1)", "#### Not comparable (1)",
                        "#### Added configs (1)", "#### Removed configs (1)", "<details><summary>Unchanged (1)</summary>"]
    assert [section_of(markdown, config)[:9] for config in ("down", "up", "other-n", "fresh", "gone")] == [
        "#### Regr", "#### Impr", "#### Not ", "#### Adde", "#### Remo"]


@pytest.mark.parametrize("column", ["split", "data_source", "sample_seed", "subset"])
def test_other_split_source_or_seed_is_not_comparable_when_both_sides_say(column):
    base, head = make_row(value=80.0, **{column: "a"}), make_row(value=60.0, **{column: "b"})

    markdown, regressed = compare([base], [head])

    assert not regressed
    assert verdicts(markdown) == [f"not comparable: different samples ({column} a vs b)"]
    assert compare([make_row(value=80.0, **{column: "a"})], [make_row(value=60.0)])[1]   # unknown on one side


def test_paired_bootstrap_is_seeded_and_pairs_only_shared_ids():
    base = SampleScores({str(i): float(i % 3 == 0) for i in range(300)}, True)
    head = SampleScores({str(i): float(i % 3 == 0 or i % 7 == 0) for i in range(50, 350)}, True)

    first, second = paired_bootstrap(base, head), paired_bootstrap(base, head)
    other_seed = paired_bootstrap(base, head, seed=1)

    assert first == second and first != other_seed
    assert first.n_paired == 250
    shared = range(50, 300)
    assert first.mean_delta == pytest.approx(np.mean([float(i % 7 == 0 and i % 3 != 0) for i in shared]))
    assert first.low < first.mean_delta < first.high
    assert PairedInterval(10, -1.0, -2.0, -0.5).excludes_zero() and not PairedInterval(10, -1.0, -2.0, 0.1).excludes_zero()


def test_truncated_csv_and_jsonl_are_reported_not_fatal(tmp_path):
    scores = vqa_scores(200, 0.9, 0)
    worse = [0.0] * 40 + scores[40:]
    base = make_run(tmp_path / "base", {"rtn-w4-all": scores})
    head = make_run(tmp_path / "head", {"rtn-w4-all": worse, "awq-w4-all": scores})
    csv_text = (head / "results.csv").read_text()
    (head / "results.csv").write_text(csv_text[:-40])             # the awq row cut mid-record
    log = head / "samples" / "llava-tiny" / "vqav2" / "rtn-w4-all.jsonl"
    log.write_text(log.read_text()[:-15])                           # the last sample cut mid-line

    result = run_cli("compare", str(base), str(head))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "on 199 paired" in result.stdout   # the intact lines of the cut log still pair
    problems = result.stdout.split("#### Input problems")[1]
    assert "dropping record" in problems and "results.csv" in problems
    assert "rtn-w4-all.jsonl: line 200: skipped, not JSON" in problems
    assert "awq-w4-all" not in result.stdout.split("#### Input problems")[0]


@pytest.mark.parametrize("damage", ["binary garbage", "header only", "empty run dir", "missing"])
def test_unusable_input_exits_2_with_one_line(tmp_path, damage):
    good = make_run(tmp_path / "good", {"rtn-w4-all": vqa_scores(50, 0.9, 0)})
    bad = tmp_path / "bad"
    if damage == "binary garbage":
        bad.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "header only":
        bad.write_text((good / "results.csv").read_text().splitlines()[0] + "\n")
    elif damage == "empty run dir":
        bad.mkdir()

    result = run_cli("compare", str(good), str(bad))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert str(bad) in result.stderr


def test_markdown_names_both_runs():
    markdown = format_markdown(compare_runs(load_run_rows([make_row()]), load_run_rows([make_row()])), "BASE-X", "HEAD-Y")
    assert "base: BASE-X" in markdown and "head: HEAD-Y" in markdown


def load_run_rows(rows):
    from reports.runs import Run
    return Run(Path("rows"), [{key: str(value) for key, value in row.items()} for row in rows])


# -- the head lacking what the base has (issue 21): exit 3, never a quiet "removed" ---------------
def cli(capsys, *args: str) -> tuple[int, str, str]:
    """python -m reports in this process (the CLI's parsing and exit codes, without a start-up)."""
    from reports.__main__ import main
    try:
        code = main(list(args))
    except SystemExit as exit_:          # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_missing_non_numeric_and_torn_head_rows_exit_3(tmp_path, capsys):
    scores = vqa_scores(50, 0.9, 1)
    base = make_run(tmp_path / "base", {"rtn": scores, "awq": scores, "gptq": scores})
    missing = make_run(tmp_path / "missing", {"rtn": scores, "awq": scores})      # gptq gone
    code, out, err = cli(capsys, "compare", str(base), str(missing))
    assert code == 3 and "gptq llava-tiny vqav2 accuracy: not in head" in out, out
    assert len(err.splitlines()) == 1 and err.startswith("error: head lacks 1 primary result(s)"), err
    assert cli(capsys, "compare", str(base), str(missing), "--allow-removed")[0] == 0

    garbage = make_run(tmp_path / "garbage", {"rtn": scores, "awq": scores, "gptq": scores})
    text = (garbage / "results.csv").read_text()
    first_value = f",{100 * sum(scores) / len(scores)!r},"
    (garbage / "results.csv").write_text(text.replace(first_value, ",n/a,", 1))
    code, out, _err = cli(capsys, "compare", str(base), str(garbage), "--allow-removed")
    assert code == 3 and "value 'n/a' in head" in out, out

    torn = make_run(tmp_path / "torn", {"rtn": scores, "awq": scores, "gptq": scores})
    (torn / "results.csv").write_text((torn / "results.csv").read_text()[:-40])     # last record cut
    code, out, _err = cli(capsys, "compare", str(base), str(torn), "--allow-removed")
    assert code == 3 and "head input damaged" in out and "dropping record" in out, out


def test_negative_tolerance_is_a_usage_error(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"rtn": vqa_scores(50, 0.9, 1)})
    code, out, err = cli(capsys, "compare", str(run), str(run), "--tolerance", "-1")
    assert code == 2 and not out and "argument --tolerance: must be >= 0" in err, err
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        compare_runs(load_run(run), load_run(run), -0.5)
