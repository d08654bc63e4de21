"""Faults at a run's start (issue 21): every bad option and bad grid value is one line and exit 4
before any work; --resume refuses a run dir measured on other samples; skips show their reason
without -rs. The command lines run in one process (tests/pytest_many.py), so the suite's
imports are paid once."""
import json
import subprocess
import sys

import pytest

from reports.csv_log import PartWriter
from reports.rundir import RunDir, RunDirError
from reports.schema import CSV_COLUMNS
from tests.bench_run import ROOT

GRID = """\
calibration: {calibration}
models:
  {model}: {{family: llava, path: {path}}}
tasks:
  vqav2: {task}
configs:
  - {{name: fp16, method: fp}}
  - {config}
"""
GOOD_CONFIG = "{name: rtn-w4-all, method: rtn, bits: {all: 4}}"


def grid(tmp_path, name, *, calibration="{task: vqav2, split: train}", model="llava-tiny",
         path="fixtures/tiny/llava-tiny", task="{data: embedded}", config=GOOD_CONFIG):
    file = tmp_path / f"{name}.yaml"
    file.write_text(GRID.format(calibration=calibration, model=model, path=path, task=task, config=config))
    return f"--grid={file}"


def run_many(tmp_path, cases, **env):
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "tests/pytest_many.py", str(tmp_path / "cases.json"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=400, env={**__import__("os").environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return [(int((out / f"{n}.rc").read_text()), (out / f"{n}.out").read_text(), (out / f"{n}.err").read_text())
            for n in range(len(cases))]


@pytest.fixture(scope="module")
def start_faults(tmp_path_factory):
    """Every command line of this module, run in one process: (expected, results, paths)."""
    tmp_path = tmp_path_factory.mktemp("start")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    report, missing = tmp_path / "run", tmp_path / "no-such-model"
    small = ["-m", "vqav2 and llava-tiny and fp16", f"--report-dir={report}"]
    expected = [   # (command line, text its one error line must hold; None: a run that works)
        (["--device", "cuda"], "--device cuda: no CUDA device visible"),
        (["--device", "tpu"], "--device tpu: unknown device; use auto, cpu, cuda or cuda:N"),
        (["--device", "cuda:7"], "--device cuda:7: no CUDA device visible"),
        (["--limit", "0"], "--limit 0: must be at least 1"),
        (["--limit", "-5"], "--limit -5: must be at least 1"),
        ([f"--cache-dir={blocker / 'cache'}"], f"--cache-dir {blocker / 'cache'} is not writable"),
        ([grid(tmp_path, "calibration", calibration="{task: vqav2, split: val}",
               config="{name: gptq-w4-all, method: gptq, bits: {all: 4}}")],
         "calibration.split: 'val' of vqav2 (embedded) is the split that config 'gptq-w4-all' is evaluated on"),
        ([grid(tmp_path, "layers", config="{name: q, method: rtn, bits: {language: 4}, layers: '0-7'}")],
         "config 'q'.layers: '0-7' selects block 7 but llava-tiny's language has 3 block(s), 0..2"),
        ([grid(tmp_path, "downwards", config="{name: q, method: rtn, bits: {language: 4}, layers: '2-1'}")],
         "configs[1].layers: range '2-1' runs downwards"),
        ([grid(tmp_path, "sym", config="{name: q, method: rtn, bits: {all: 4}, sym: 'no'}")],
         "configs[1].sym: must be true or false, got 'no'"),
        ([grid(tmp_path, "damp", config="{name: q, method: gptq, bits: {all: 4}, params: {damp: -0.1}}")],
         "parameter damp must be >= 0"),
        ([grid(tmp_path, "config-name", config="{name: ../../escape, method: rtn, bits: {all: 4}}")],
         "configs[1].name: a name must be"),
        ([grid(tmp_path, "model-name", model="../m")], "models.../m: a name must be"),
        # A run dir measured with --limit 4, then resumed with --limit 3: refused, not mixed.
        ([*small, "--limit", "4"], None),
        ([*small[:-1], f"--resume={report}", "--limit", "3"], "task vqav2: limit 4 there, 3 now"),
        # A model that is not there: its tests are skipped, and the summary says why.
        ([grid(tmp_path, "missing", path=str(missing)), "-m", "vqav2", f"--report-dir={tmp_path / 'skips'}"], None),
    ]
    # Should a check let its case through, the run stays small and out of the repository.
    scratch = ["-m", "vqav2 and llava-tiny and fp16", "--limit=2", f"--report-dir={tmp_path / 'scratch'}"]
    results = run_many(tmp_path, [args if text is None or "--resume" in str(args) else [*scratch, *args]
                                  for args, text in expected], CUDA_VISIBLE_DEVICES="")
    return expected, results, {"report": report, "missing": missing}


def test_bad_options_grids_and_resumes_are_one_line_and_exit_4_before_any_work(start_faults):
    expected, results, paths = start_faults
    wrong = []      # every case that misbehaves, not only the first
    for (args, text), (code, stdout, stderr) in zip(expected, results):
        errors = [line for line in stderr.splitlines() if line.strip()]
        if text is None:
            ok = code == 0
        else:
            ok = (code == 4 and len(errors) == 1 and errors[0].startswith("ERROR: ") and text in errors[0]
                  and "passed" not in stdout and "Traceback" not in stdout + stderr)
        if not ok:
            wrong.append(f"{args[-1]}: exit {code}, {len(errors)} stderr line(s): {(errors or [''])[-1][:200]}")
    assert not wrong, "\n".join(wrong)
    # The refused resume wrote nothing: the first run's files are as it left them.
    assert not (paths["report"] / "previous").exists() and (paths["report"] / "results.csv").is_file()


def test_skips_show_their_reason_without_rs(start_faults):
    _expected, results, paths = start_faults
    _code, stdout, _stderr = results[-1]
    lines = [line for line in stdout.splitlines() if line.startswith("SKIPPED (2): ")]
    assert len(lines) == 1 and str(paths["missing"]) in lines[0], stdout[-3000:]
    assert "test_vqav2[llava-tiny-fp16]" in lines[0] and "test_vqav2[llava-tiny-rtn-w4-all]" in lines[0]


def test_resume_of_a_dir_without_its_identity_file_checks_the_rows(tmp_path):
    """A dir made by an older version, or merged from such shards, has no run-identity.json:
    its rows say on which samples each test was measured."""
    row = {column: "" for column in CSV_COLUMNS} | {
        "task": "vqav2", "model": "llava-tiny", "metric": "accuracy", "primary": "true", "status": "passed",
        "n_samples": "4", "split": "val", "data_source": "embedded", "sample_seed": "0"}
    PartWriter(tmp_path / "results.csv").write_rows([row])
    run_dir = RunDir(tmp_path)

    def wanted(**task):
        return {"tasks": {"vqav2": {"split": "val", "data": "embedded", "limit": 4, "sample_seed": 0} | task}}

    assert run_dir.identity_conflicts(wanted()) == []
    assert run_dir.identity_conflicts(wanted(limit=3)) == ["task vqav2: 4 samples there, limit 3 now"]
    assert run_dir.identity_conflicts(wanted(limit=None)) == [
        "task vqav2: a seeded subset of 4 samples there, the whole split now"]
    assert run_dir.identity_conflicts(wanted(split="test")) == ["task vqav2: split val there, test now"]
    # Rows from before the subset column: VQAv2's limited subset was drawn question by question.
    assert run_dir.identity_conflicts(wanted(subset="images")) == [
        "task vqav2: a subset drawn by samples there, by images now"]
    with pytest.raises(RunDirError, match=r"would measure other samples .*4 samples there, limit 3 now"):
        run_dir.check_resumable(wanted(limit=3))
