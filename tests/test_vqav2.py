"""VQAv2 loaders on the official format (generated, malformed, missing) and batch invariance."""
import json
from dataclasses import replace
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
    generate_world(root, seed=3, layout={"vqav2": {"train": 4, "val": 30}}, progress=False)
    return root


def test_generator_is_deterministic(world, tmp_path):
    generate_world(tmp_path, seed=3, layout={"vqav2": {"train": 4, "val": 30}}, progress=False)
    name = "v2_mscoco_val2014_annotations.json"
    assert (tmp_path / "vqav2" / name).read_text() == (world / "vqav2" / name).read_text()


def test_official_files_load_with_ten_answers(world):
    samples = vqav2.load_official(world / "vqav2", "val2014")
    assert len(samples) > 30
    assert all(len(s.answers) == 10 for s in samples)
    assert samples[0].image().size == (48, 48)
    assert {s.answer_type for s in samples} <= {"yes/no", "number", "other"}


def test_a_limited_subset_keeps_each_images_questions_together(world):
    samples = vqav2.load_official(world / "vqav2", "val2014")
    per_image = {}
    for sample in samples:
        per_image[sample.image_id] = per_image.get(sample.image_id, 0) + 1
    limit = len(samples) // 3
    subset = vqav2.TASK.subset(samples, limit, 0)
    assert len(subset) == limit and len({s.question_id for s in subset}) == limit
    taken = {}
    for sample in subset:
        taken[sample.image_id] = taken.get(sample.image_id, 0) + 1
    # Every image drawn brings all its questions but the last one drawn, which fills the limit.
    partial = [image for image, n in taken.items() if n < per_image[image]]
    assert len(partial) <= 1, partial
    assert len(taken) < limit   # several questions per image: fewer images than questions
    order = {s.question_id: i for i, s in enumerate(samples)}
    assert [order[s.question_id] for s in subset] == sorted(order[s.question_id] for s in subset)
    # Seeded: the same subset again, another with another seed, the same images from a file in
    # another order (the file's order picks only which questions of the last image fill the limit).
    assert vqav2.TASK.subset(samples, limit, 0) == subset
    assert vqav2.TASK.subset(samples, limit, 1) != subset
    assert {s.image_id for s in vqav2.TASK.subset(list(reversed(samples)), limit, 0)} == set(taken)
    assert vqav2.TASK.subset(samples, len(samples), 0) is samples


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


def test_shared_image_prefix_gives_the_unshared_predictions(world, monkeypatch):
    from fixtures.adapters import shared_prefix

    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:40]
    assert len({s.image_id for s in samples}) < len(samples)   # images asked about more than once
    unshared = vqav2.evaluate(adapter, samples, batch_size=20, progress=False)

    layouts = []
    real_layout = shared_prefix.shared_layout
    monkeypatch.setattr(shared_prefix, "shared_layout", lambda *a: layouts.append(real_layout(*a)) or layouts[-1])
    shared = vqav2.evaluate(adapter, samples, batch_size=20, progress=False,
                            generation=replace(vqav2.GENERATION, share_image_prefix=True))
    prefixes = [layout[1] for layout in layouts if layout is not None]
    per_batch = [len({s.image_id for s in samples[i:i + 20]}) for i in (0, 20)]   # an image may span both
    assert [len(p) for p in prefixes] == per_batch and sum(per_batch) < len(samples)
    assert [s["prediction"] for s in shared.samples] == [s["prediction"] for s in unshared.samples]
    assert shared.metrics == unshared.metrics


def test_shared_layout_keeps_each_question_and_declines_when_nothing_repeats():
    from fixtures.adapters.shared_prefix import shared_layout

    image, pad = 9, 0
    # Left-padded rows: [pad..] [1 image image] [question]; rows 0 and 2 show the same image.
    ids = torch.tensor([[0, 0, 1, 9, 9, 5, 6], [0, 1, 9, 9, 7, 7, 7], [1, 9, 9, 8, 8, 8, 8]])
    mask = (ids != 0).long()
    pixels = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.zeros(3, 2, 2)])
    prefix, unique, image_of_row, new_ids, new_mask = shared_layout(ids, mask, pixels, image, pad)
    assert prefix.tolist() == [1, 9, 9] and image_of_row.tolist() == [0, 1, 0]
    assert torch.equal(unique, pixels[:2])
    assert new_ids.tolist() == [[1, 9, 9, 0, 0, 5, 6], [1, 9, 9, 0, 7, 7, 7], [1, 9, 9, 8, 8, 8, 8]]
    assert torch.equal(new_mask, (new_ids != 0).long())
    assert shared_layout(ids[:2], mask[:2], pixels[:2], image, pad) is None          # no repeat
    other = ids.clone()
    other[2, 0] = 2                                                                   # other prefix
    assert shared_layout(other, (other != 0).long(), pixels, image, pad) is None


def test_blip2_beam_search_batched_matches_batch_size_one(world):
    # LAVIS decodes BLIP-2 with 5 beams; the grid asks for it per model. Batched beams must give
    # what one question at a time gives, as greedy does.
    adapter = load_adapter("b", "blip2", "fixtures/tiny/blip2-tiny", torch.device("cpu"), "float32", ROOT)
    beams = replace(vqav2.GENERATION, num_beams=5)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:16]
    one = vqav2.evaluate(adapter, samples, batch_size=1, progress=False, generation=beams)
    many = vqav2.evaluate(adapter, samples, batch_size=16, progress=False, generation=beams)
    assert [s["prediction"] for s in one.samples] == [s["prediction"] for s in many.samples]
