"""The embedded world's generator: layouts in the manifest, and the training-only ScienceQA
world that extends the main world's train split without touching its evaluation splits."""
import json

from fixtures.world.generate import ensure_world, read_manifest


def _problems(root, split):
    problems = json.loads((root / "scienceqa" / "problems.json").read_text())
    pids = json.loads((root / "scienceqa" / "pid_splits.json").read_text())[split]
    return [problems[pid] for pid in pids]


def test_a_larger_train_split_starts_with_the_smaller_one(tmp_path):
    small = ensure_world(tmp_path / "small", 0, {"scienceqa": {"train": 20, "test": 5}})
    large = ensure_world(tmp_path / "large", 0, {"scienceqa": {"train": 45}})
    assert _problems(large, "train")[:20] == _problems(small, "train")
    assert len(_problems(large, "train")) == 45


def test_ensure_world_regenerates_only_when_the_layout_changes(tmp_path):
    root = tmp_path / "w"
    layout = {"scienceqa": {"train": 6}}
    ensure_world(root, 0, layout)
    stamp = (root / "WORLD.json").stat().st_mtime_ns
    ensure_world(root, 0, layout)
    assert (root / "WORLD.json").stat().st_mtime_ns == stamp
    ensure_world(root, 0, {"scienceqa": {"train": 8}})
    assert read_manifest(root)["layout"] == {"scienceqa": {"train": 8}}
    assert len(_problems(root, "train")) == 8


def test_folders_written_in_parallel_are_the_files_written_one_after_the_other(tmp_path, monkeypatch):
    from fixtures.world import generate
    layout = {"vqav2": {"train": 3, "val": 4}, "flickr30k": {"test": 3}, "scienceqa": {"train": 4}}
    generate.generate_world(tmp_path / "parallel", 0, layout, progress=False)
    monkeypatch.setattr(generate.os, "cpu_count", lambda: 1)
    generate.generate_world(tmp_path / "serial", 0, layout, progress=False)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}  # noqa: E731
    parallel, serial = files(tmp_path / "parallel"), files(tmp_path / "serial")
    assert len(parallel) > 10 and parallel == serial


def test_a_folder_is_generated_when_first_needed_and_equals_the_whole_worlds(tmp_path):
    layout = {"vqav2": {"train": 3, "val": 4}, "flickr30k": {"test": 3}, "scienceqa": {"train": 4}}
    root = ensure_world(tmp_path / "lazy", 0, layout, folders=["vqav2"])
    assert {p.name for p in root.iterdir()} == {"vqav2", "scenes", "WORLD.json"}
    questions = root / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    stamp = questions.stat().st_mtime_ns
    ensure_world(root, 0, layout, folders=["flickr30k"])
    assert questions.stat().st_mtime_ns == stamp and (root / "flickr30k").is_dir()
    assert "scienceqa" not in read_manifest(root)
    ensure_world(root, 0, layout)   # the rest
    whole = ensure_world(tmp_path / "whole", 0, layout)
    files = lambda r: {p.relative_to(r): p.read_bytes() for p in sorted(r.rglob("*")) if p.is_file()}  # noqa: E731
    assert files(root) == files(whole)


def test_a_run_makes_the_folders_its_cases_read_together_at_its_first_load(tmp_path):
    from pathlib import Path

    from fixtures.runtime.data import DataStore
    from fixtures.runtime.grid import TaskSpec, load_grid
    from fixtures.runtime.run import embedded_folders
    from fixtures.world.generate import default_layout
    grids = Path(__file__).resolve().parents[1] / "benchmarks" / "grids"
    perf = load_grid(grids / "perf.yaml").cases
    assert embedded_folders(c for c in perf if c.model.family == "llava") == {"vqav2"}
    assert embedded_folders(load_grid(grids / "default.yaml").cases) == set(default_layout())
    layout = {"vqav2": {"train": 3, "val": 4}, "flickr30k": {"test": 3}, "scienceqa": {"train": 4}}
    store = DataStore(tmp_path, tmp_path, world_layout=layout, world_folders={"flickr30k"})
    assert len(store.load(TaskSpec("vqav2", data="embedded", split="val"))) > 0
    made = read_manifest(tmp_path / "world")
    assert {"vqav2", "flickr30k"} <= set(made) and "scienceqa" not in made


def test_images_drawn_by_several_processes_are_the_files_drawn_by_one(tmp_path, monkeypatch):
    """One folder on two cores: its process draws the images with two forked workers
    (scenes.save_renders); one core: everything in this process, one image after the other."""
    from fixtures.world import generate
    layout = {"vqav2": {"train": 70, "val": 4}}
    monkeypatch.setattr(generate.os, "cpu_count", lambda: 2)
    generate.generate_world(tmp_path / "two", 0, layout, progress=False)
    monkeypatch.setattr(generate.os, "cpu_count", lambda: 1)
    generate.generate_world(tmp_path / "one", 0, layout, progress=False)
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}  # noqa: E731
    two, one = files(tmp_path / "two"), files(tmp_path / "one")
    assert sum(p.suffix == ".jpg" for p in one) == 74 and two == one
