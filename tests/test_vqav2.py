"""VQAv2 loaders on the official format (generated, malformed, missing) and batch invariance."""
import json
from pathlib import Path

import pytest
import torch

from fixtures.adapters import load_adapter
from fixtures.world.generate import generate_world
from tasks import vqav2
from tasks.base import DataError, DataMissing, open_image

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    generate_world(root, seed=3, split_images={"train": 4, "val": 30}, progress=False)
    return root


def test_generator_is_deterministic(world, tmp_path):
    generate_world(tmp_path, seed=3, split_images={"train": 4, "val": 30}, progress=False)
    name = "v2_mscoco_val2014_annotations.json"
    assert (tmp_path / "vqav2" / name).read_text() == (world / "vqav2" / name).read_text()


def test_official_files_load_with_ten_answers(world):
    samples = vqav2.load_official(world / "vqav2", "val2014")
    assert len(samples) > 30
    assert all(len(s.answers) == 10 for s in samples)
    assert samples[0].image().size == (48, 48)
    assert {s.answer_type for s in samples} <= {"yes/no", "number", "other"}


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataMissing, match="v2_OpenEnded_mscoco_val2014_questions.json"):
        vqav2.load_official(tmp_path, "val2014")


def test_malformed_files_name_file_and_field(world, tmp_path):
    for name in ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"):
        (tmp_path / name).write_text((world / "vqav2" / name).read_text())
    questions = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(questions.read_text())
    del data["questions"][2]["question"]
    questions.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"questions\[2\]: missing field\(s\) question"):
        vqav2.load_official(tmp_path, "val2014")
    questions.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        vqav2.load_official(tmp_path, "val2014")


def test_unreadable_image_is_a_data_error(world, tmp_path):
    sample = vqav2.load_official(world / "vqav2", "val2014")[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    sample._load = open_image(broken)
    with pytest.raises(DataError, match="broken.jpg: unreadable image"):
        sample.image()


def test_batched_greedy_matches_batch_size_one(world):
    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:24]
    one = vqav2.evaluate(adapter, samples, batch_size=1, progress=False)
    many = vqav2.evaluate(adapter, samples, batch_size=24, progress=False)
    assert [s["prediction"] for s in one.samples] == [s["prediction"] for s in many.samples]
    assert one.metrics == many.metrics
