"""The contracts of the registries' entries, parametrized over the registries themselves: a new
task, model family or world writer is covered by these tests as soon as its module registers it."""
import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.adapters import FAMILIES
from fixtures.runtime.grid import load_grid
from fixtures.world.writers import ID_BASE, WRITERS
from tasks.registry import TASKS
from tasks.requests import REQUEST_KINDS, REQUESTS, Generates, Generation

ROOT = Path(__file__).resolve().parent.parent


def _generative(kind: str) -> bool:
    return issubclass(REQUESTS[kind], Generates)


@pytest.mark.parametrize("name", list(TASKS))
def test_a_task_declares_itself_completely(name):
    task = TASKS.get(name)
    assert task.name == name
    assert callable(task.load_official) and callable(task.load_hf) and callable(task.evaluate)
    assert task.requests and set(task.requests) <= set(REQUEST_KINDS)
    parameters = inspect.signature(task.evaluate).parameters
    assert {"batch_size", "progress", *task.options} <= set(parameters), "evaluate takes what the runtime passes"


@pytest.mark.parametrize("name", list(TASKS))
def test_a_task_that_generates_declares_its_decoding(name):
    """Its own defaults (max_new_tokens among them) in the TaskDef, taken by evaluate, which the
    grid's overrides are merged over; a task that sends no generative request has none."""
    task = TASKS.get(name)
    generates = any(_generative(kind) for kind in task.requests)
    assert (task.generation is not None) == generates
    if generates:
        assert isinstance(task.generation, Generation) and task.generation.max_new_tokens >= 1
        assert inspect.signature(task.evaluate).parameters["generation"].default == task.generation


@pytest.mark.parametrize("name", list(TASKS))
def test_a_task_is_served_by_a_family_and_has_an_embedded_world(name):
    task = TASKS.get(name)
    assert any(family.serves(task.requests) for family in FAMILIES.all().values())
    assert task.folder in WRITERS, f"no world writer registers the folder {task.folder!r}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_family_implements_the_contract(name):
    family = FAMILIES.get(name)
    assert family.family == name
    assert not inspect.isabstract(family), f"abstract methods left: {sorted(family.__abstractmethods__)}"
    assert family.request_kinds() and family.request_kinds() <= set(REQUEST_KINDS)
    import transformers
    assert isinstance(getattr(transformers, family.model_class, None), type), "load() builds its model_class"
    assert family.random_init is None or callable(family.random_init)
    components = set(family.components)
    assert set(family.quantizable) <= components and set(family.protected) <= components
    assert set(family.stacks) <= components and set(family.layouts) <= components


@pytest.mark.parametrize("folder", list(WRITERS))
def test_a_world_writer_serves_a_task(folder):
    writer = WRITERS.get(folder)
    assert writer.folder == folder and callable(writer.write) and callable(writer.scenes)
    assert writer.sizes and set(writer.sizes) <= set(ID_BASE)
    assert any(task.folder == folder for task in TASKS.all().values())


def test_generation_keys_are_its_fields_and_each_checks_its_values():
    from tasks.requests import GENERATION_KEYS, generation_setting_error
    assert GENERATION_KEYS == tuple(f.name for f in dataclasses.fields(Generation))
    assert generation_setting_error("num_beams", 5) is None
    assert generation_setting_error("min_length", 0) is None
    assert generation_setting_error("max_new_tokens", 0) == "must be an integer >= 1, got 0"
    assert generation_setting_error("length_buckets", 1) == "must be true or false, got 1"
    assert Generation(max_new_tokens=5).merged({"num_beams": 3}) == Generation(max_new_tokens=5, num_beams=3)


def test_a_task_needs_no_test_file_of_its_own(tmp_path):
    """A benchmarks folder with one task's file collects every registered task, each under the
    node id its own `benchmarks/test_<task>.py` would give (the run's identity everywhere)."""
    shutil.copy(ROOT / "pytest.ini", tmp_path / "pytest.ini")
    (tmp_path / "benchmarks").mkdir()
    kept = sorted((ROOT / "benchmarks").glob("test_*.py"))[0]
    shutil.copy(kept, tmp_path / "benchmarks" / kept.name)
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    grid = load_grid(ROOT / "benchmarks" / "grids" / "default.yaml")
    expected = {f"benchmarks/test_{task}.py::test_{task}[{case.id}]" for task in TASKS for case in grid.cases_for(task)}
    assert {line for line in out.stdout.splitlines() if "::" in line} == expected
