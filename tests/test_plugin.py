"""The plugin seen from the command line: mark selection, ids, and one-line usage errors."""
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reports.csv_log import read_rows

ROOT = Path(__file__).resolve().parent.parent


def pytest_run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def collected(*args):
    out = pytest_run("--collect-only", "-q", *args)
    assert out.returncode in (0, 5), out.stdout + out.stderr
    return sorted(line.split("::", 1)[1] for line in out.stdout.splitlines() if "::" in line)


@functools.cache
def marks_of(*args) -> dict[str, frozenset]:
    """Every collected benchmark's marks, from one collection."""
    out = pytest_run("--collect-only", "-q", "-p", "tests.dump_marks", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line.removeprefix("MARKS ")) for line in out.stdout.splitlines() if line.startswith("MARKS ")]
    return {name: frozenset(marks) for name, marks in rows}


def selected(expr: str, *args) -> list[str]:
    """What `pytest -m expr` selects, by pytest's own mark-expression evaluator over one collection
    (test_w4_selects_exactly_the_four_bit_parameters checks the two agree)."""
    from _pytest.mark.expression import Expression
    expression = Expression.compile(expr)
    return sorted(name for name, marks in marks_of(*args).items()
                  if expression.evaluate(lambda mark, **kwargs: mark in marks))


LLAVA_TASKS = ("coco_caption", "scienceqa", "text_ppl", "vizwiz", "vqav2")
BLIP2_CASES = ("test_coco_caption[blip2-tiny-{}]", "test_vqav2[blip2-tiny-{}]",
               "test_flickr_retrieval[blip2-tiny-retrieval-{}]")


def every_task(config):
    """The ids of one config run on every task of every model in the default grid."""
    return [f"test_{t}[llava-tiny-{config}]" for t in LLAVA_TASKS] + [c.format(config) for c in BLIP2_CASES]


def test_w4_selects_exactly_the_four_bit_parameters():
    vqa_only = [f"test_vqav2[llava-tiny-{c}]" for c in ("gptq-w4-all", "rtn-w4-language",
                                                        "rtn-w4-vision", "rtn-w4g32-all")]
    weights_and_activations = [f"test_scienceqa[llava-tiny-{c}]" for c in ("awq-w4a4-all", "qvlm-w4a4-all")]
    expected = sorted(every_task("rtn-w4-all") + every_task("awq-w4-all") + vqa_only + weights_and_activations)
    assert collected("-m", "w4") == expected
    assert selected("w4") == expected     # the evaluator the other selections use agrees with -m


def test_issue_selections_run_every_task_of_every_model():
    assert selected("w3 and gptq and not qig") == sorted(every_task("gptq-w3-all"))
    assert selected("w4 and awq and not a4") == sorted(every_task("awq-w4-all"))
    assert selected("a4 and qvlm") == ["test_scienceqa[llava-tiny-qvlm-w4a4-all]"]


@pytest.mark.parametrize("expr, expected", [
    ("fp16 and vqav2", ["test_vqav2[blip2-tiny-fp16]", "test_vqav2[llava-tiny-fp16]"]),
    ("w8", ["test_vqav2[llava-tiny-rtn-w8-all]"]),
    ("w4 and vision and not language and llava-tiny", ["test_vqav2[llava-tiny-rtn-w4-vision]"]),
    ("w4 and qformer and rtn", ["test_coco_caption[blip2-tiny-rtn-w4-all]",
                                "test_flickr_retrieval[blip2-tiny-retrieval-rtn-w4-all]",
                                "test_vqav2[blip2-tiny-rtn-w4-all]"]),
    ("vqav2 and llava-tiny and w3 and not qig", ["test_vqav2[llava-tiny-gptq-w3-all]",
                                                 "test_vqav2[llava-tiny-rtn-w3-all]"]),
    ("qig", ["test_vqav2[llava-tiny-awq-qig-w3a16-language]", "test_vqav2[llava-tiny-gptq-qig-w3a16-language]"]),
    ("fp16 and text_ppl", ["test_text_ppl[llava-tiny-fp16]"]),
])
def test_mark_expressions(expr, expected):
    assert selected(expr) == expected


def metric_values(report_dir):
    return {(row["test_id"], row["metric"]): row["value"] for row in read_rows(report_dir / "results.csv")}


def test_xdist_gives_the_metrics_and_test_ids_of_a_serial_run(tmp_path):
    select = ["-m", "w4 and rtn and llava-tiny and (vqav2 or vizwiz)", "--limit", "40"]
    serial = pytest_run(*select, f"--report-dir={tmp_path / 'serial'}")
    spread = pytest_run(*select, "-n", "2", f"--report-dir={tmp_path / 'xdist'}")
    assert serial.returncode == 0, serial.stdout[-3000:] + serial.stderr[-3000:]
    assert spread.returncode == 0, spread.stdout[-3000:] + spread.stderr[-3000:]
    expected = metric_values(tmp_path / "serial")
    assert len({test_id for test_id, _ in expected}) == 5   # rtn-w4-all on both tasks
    assert metric_values(tmp_path / "xdist") == expected
    # --dist loadgroup keeps a config's tests on one worker, which quantizes it once (pytest 9.2
    # with xdist 3.8 silently dropped the groups: pyproject.toml pins pytest below it).
    workers: dict[str, set] = {}
    for row in read_rows(tmp_path / "xdist" / "results.csv"):
        workers.setdefault(row["config"], set()).add(row["worker"])
    assert len(workers) == 4 and all(len(w) == 1 for w in workers.values()), workers


def test_sensitivity_grid_covers_every_scope_and_bit_width():
    names = collected("--grid", "benchmarks/grids/sensitivity.yaml")
    ids = [i.split("[")[1].rstrip("]") for i in names if "llava-tiny" in i]
    assert len(ids) == 16 * 4   # every config on each of the four tasks the tiny LLaVA serves
    retrieval = [i for i in names if "retrieval-" in i]
    assert all(i.startswith("test_flickr_retrieval[") for i in retrieval)
    assert not any("language" in i for i in retrieval) and any("qformer" in i for i in retrieval)
    for scope in ("vision", "language", "all"):
        for bits in (8, 4, 3, 2):
            assert f"llava-tiny-rtn-w{bits}-{scope}" in ids
    assert not any("qformer" in i for i in ids)   # LLaVA has no Q-Former: never generated


def test_malformed_grid_is_one_clear_usage_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {family: llava, path: x}}\ntasks: {vqav2: {}}\n"
                   "configs: [{name: q, method: rtn, bits: {language: 12}}]\n")
    out = pytest_run("--collect-only", f"--grid={bad}")
    assert out.returncode == 4
    assert "configs[0]: config 'q': bits for 'language' must be an integer in 2..8, got 12" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_model_is_a_skip_naming_the_path(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("models: {ghost: {family: llava, path: /nonexistent/llava}}\n"
                    "tasks: {vqav2: {}}\nconfigs: [{name: fp16, method: fp}]\n")
    out = pytest_run("-rs", f"--grid={grid}", f"--report-dir={tmp_path / 'r'}", "benchmarks")
    assert out.returncode == 0, out.stdout
    assert "model not found: /nonexistent/llava" in out.stdout


def test_paper_grid_without_the_weights_skips_every_test_naming_the_id(tmp_path):
    out = pytest_run("-rs", "--grid=benchmarks/grids/paper.yaml", f"--report-dir={tmp_path / 'r'}", "benchmarks")
    assert out.returncode == 0, out.stdout[-2000:]
    skips = [line for line in out.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and "passed" not in out.stdout.splitlines()[-1]
    ids = ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf", "Salesforce/blip2-opt-2.7b",
           "Salesforce/blip2-itm-vit-g-coco")
    named = [line for line in skips if any(f"model '{i}' could not be loaded offline" in line for i in ids)]
    # Every skip names a missing id, except the text check's: the paper grid has no text_ppl case.
    assert len(named) == len(skips) - 1, "\n".join(skips)
    assert all(any(i in "\n".join(named) for i in [id_]) for id_ in ids)


def test_random_init_architecture_runs_end_to_end_and_is_labelled(tmp_path):
    """A down-scaled copy of the shipped LLaVA-1.5-7B config through the random-init path: RTN
    and GPTQ run, every row says random-init, and the summary says these are no accuracy."""
    import json
    import shutil
    config_dir = tmp_path / "llava-small"
    shutil.copytree(ROOT / "fixtures/configs/llava-1.5-7b-hf", config_dir)
    config = json.loads((config_dir / "config.json").read_text())
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=4, num_hidden_layers=2)
    config["vision_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
    (config_dir / "config.json").write_text(json.dumps(config))
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"models: {{small: {{family: llava, path: {config_dir}, random_init: true}}}}\n"
                    "tasks: {vqav2: {limit: 4, batch_size: 4}}\n"
                    "calibration: {samples: 4, batch_size: 2}\n"
                    "configs: [{name: fp16, method: fp}, {name: rtn, method: rtn, bits: {all: 4}},\n"
                    "          {name: gptq, method: gptq, bits: {language: 4}, group_size: 32}]\n")
    out = pytest_run(f"--grid={grid}", f"--report-dir={tmp_path / 'r'}",
                     "benchmarks/test_vqav2.py")
    assert out.returncode == 0, out.stdout[-3000:]
    rows = read_rows(tmp_path / "r" / "results.csv")
    assert len({r["config"] for r in rows}) == 3 and all(r["weights"] == "random-init" for r in rows)
    # The FP row is the shared baseline: it records the seconds that baseline's evaluation took.
    assert all(float(r["eval_seconds"]) > 0 for r in rows if r["config"] == "fp16")
    assert "3 of them on random-init weights: timings and memory only, never accuracy" in out.stdout


def primary_test_ids(report_dir):
    return [row["test_id"] for row in read_rows(report_dir / "results.csv") if row["primary"] == "true"]


def test_a_benchmark_run_is_told_by_what_it_collects_not_by_its_arguments(tmp_path):
    """Run from inside benchmarks/, where no argument names that folder, a grid test still makes
    a run with its results; the suite's own tests given a --report-dir leave no run dir there."""
    inside = pytest_run("test_vqav2.py", "-m", "llava-tiny and fp16", "--limit=2", f"--report-dir={tmp_path / 'run'}",
                        cwd=ROOT / "benchmarks")
    assert inside.returncode == 0, inside.stdout[-3000:] + inside.stderr[-3000:]
    assert primary_test_ids(tmp_path / "run") == ["benchmarks/test_vqav2.py::test_vqav2[llava-tiny-fp16]"]
    own = pytest_run("tests/test_vqa_eval.py", f"--report-dir={tmp_path / 'unit'}")
    assert own.returncode == 0, own.stdout[-3000:] + own.stderr[-3000:]
    assert not (tmp_path / "unit").exists()


def test_options_take_their_value_after_a_space(tmp_path):
    """`--report-dir DIR` and `--resume DIR` written with a space, DIR outside the repository. Once
    DIR exists, pytest would take it for a test path and its rootdir unless a test path comes
    first (README, "Using pytest directly"): then --resume reads it as its run dir."""
    run, select = tmp_path / "run", ["-m", "vqav2 and llava-tiny and fp16", "--limit", "2"]
    first = pytest_run(*select, "--report-dir", str(run))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert primary_test_ids(run) == ["benchmarks/test_vqav2.py::test_vqav2[llava-tiny-fp16]"]
    again = pytest_run("benchmarks", *select, "--resume", str(run))
    assert again.returncode == 5, again.stdout[-3000:] + again.stderr[-3000:]     # it passed: nothing left
    assert re.search(r"\d+ deselected / 0 selected", again.stdout) and f"rootdir: {ROOT}" in again.stdout
    assert primary_test_ids(run) == ["benchmarks/test_vqav2.py::test_vqav2[llava-tiny-fp16]"]
