"""The plugin seen from the command line: mark selection, ids, and one-line usage errors."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def collected(*args):
    out = pytest_run("--collect-only", "-q", *args)
    assert out.returncode in (0, 5), out.stdout + out.stderr
    return sorted(line.split("[", 1)[1].rstrip("]") for line in out.stdout.splitlines() if "::" in line)


def test_w4_selects_exactly_the_four_bit_parameters():
    assert collected("-m", "w4") == ["llava-tiny-awq-w4-all", "llava-tiny-gptq-w4-all",
                                     "llava-tiny-rtn-w4-all", "llava-tiny-rtn-w4-language",
                                     "llava-tiny-rtn-w4-vision", "llava-tiny-rtn-w4g32-all"]


@pytest.mark.parametrize("expr, expected", [
    ("fp16", ["llava-tiny-fp16"]),
    ("w8", ["llava-tiny-rtn-w8-all"]),
    ("w4 and vision and not language", ["llava-tiny-rtn-w4-vision"]),
    ("vqav2 and llava-tiny and w3", ["llava-tiny-rtn-w3-all"]),
])
def test_mark_expressions(expr, expected):
    assert collected("-m", expr) == expected


def test_sensitivity_grid_covers_every_scope_and_bit_width():
    ids = [i for i in collected("--grid", "benchmarks/grids/sensitivity.yaml") if i != "no-case"]
    assert len(ids) == 13 * 4   # every config on each of the four tasks the tiny LLaVA serves
    for scope in ("vision", "language", "all"):
        for bits in (8, 4, 3, 2):
            assert f"llava-tiny-rtn-w{bits}-{scope}" in ids


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
