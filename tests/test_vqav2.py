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


def encode_questions(adapter, samples):
    """The processor's output for these samples' short-answer prompts, as the task encodes a batch."""
    return adapter.encode([s.image() for s in samples], [adapter.short_answer_prompt(s.question) for s in samples])


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


def record_packed(monkeypatch) -> list:
    """What each call of the packed path returned (None: it declined and generate ran)."""
    from fixtures.adapters import llava

    packed, real_generate = [], llava.generate_packed
    monkeypatch.setattr(llava, "generate_packed", lambda *a, **kw: packed.append(real_generate(*a, **kw)) or packed[-1])
    return packed


def test_shared_image_prefix_gives_the_unshared_predictions(world, monkeypatch):
    from fixtures.adapters import shared_prefix

    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:40]
    assert len({s.image_id for s in samples}) < len(samples)   # images asked about more than once
    unshared = vqav2.evaluate(adapter, samples, batch_size=20, progress=False)

    layouts, real_pack = [], shared_prefix.pack
    monkeypatch.setattr(shared_prefix, "pack", lambda *a: layouts.append(real_pack(*a)) or layouts[-1])
    packed = record_packed(monkeypatch)
    shared = vqav2.evaluate(adapter, samples, batch_size=20, progress=False,
                            generation=replace(vqav2.GENERATION, share_image_prefix=True))
    prefixes = [layout.pixels for layout in layouts if layout is not None]
    per_batch = [len({s.image_id for s in samples[i:i + 20]}) for i in (0, 20)]   # an image may span both
    assert [len(p) for p in prefixes] == per_batch and sum(per_batch) < len(samples)
    assert len(packed) == 2 and all(result is not None for result in packed), "both batches decoded packed"
    assert [s["prediction"] for s in shared.samples] == [s["prediction"] for s in unshared.samples]
    assert shared.metrics == unshared.metrics


def test_a_batch_of_distinct_images_decodes_packed_with_the_unshared_predictions(world, monkeypatch):
    """Nothing to share, but the packed decode still runs (its buffers spare generate's cache
    copies): one row per question, the unshared predictions."""
    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    first_question = {}
    for sample in vqav2.load_official(world / "vqav2", "val2014"):
        first_question.setdefault(sample.image_id, sample)
    samples = list(first_question.values())[:12]
    assert len(samples) == 12
    unshared = vqav2.evaluate(adapter, samples, batch_size=12, progress=False)
    packed = record_packed(monkeypatch)
    shared = vqav2.evaluate(adapter, samples, batch_size=12, progress=False,
                            generation=replace(vqav2.GENERATION, share_image_prefix=True))
    assert len(packed) == 1 and packed[0] is not None, "decoded packed"
    assert [s["prediction"] for s in shared.samples] == [s["prediction"] for s in unshared.samples]


def test_shared_image_prefix_keeps_a_minimum_of_new_tokens(world):
    """generate suppresses end-of-sequence until min_length new tokens; the packed decode too."""
    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:20]
    longer = replace(vqav2.GENERATION, min_length=4)
    unshared = vqav2.evaluate(adapter, samples, batch_size=20, progress=False, generation=longer)
    shared = vqav2.evaluate(adapter, samples, batch_size=20, progress=False,
                            generation=replace(longer, share_image_prefix=True))
    plain = vqav2.evaluate(adapter, samples, batch_size=20, progress=False)
    assert [s["prediction"] for s in shared.samples] == [s["prediction"] for s in unshared.samples]
    assert [s["prediction"] for s in unshared.samples] != [s["prediction"] for s in plain.samples]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; none here")
def test_captured_decode_steps_give_the_eager_steps_tokens(world):
    """On a GPU the packed decode step is captured once per shape and replayed: the same kernels
    on the same buffers, so the same tokens as the eager step, batch after batch."""
    from fixtures.adapters import shared_prefix

    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cuda"), "float32", ROOT)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:60]
    language, pad = adapter.component("language"), adapter.processor.tokenizer.pad_token_id
    for start in (0, 20, 40):
        chosen = samples[start:start + 20]
        encoded = encode_questions(adapter, chosen)
        tokens = {graphs: shared_prefix.generate_packed(adapter.model, language, adapter.to_device, encoded,
                                                        adapter.model.config.image_token_id, pad,
                                                        vqav2.GENERATION.max_new_tokens, graphs=graphs)[0]
                  for graphs in (False, True)}
        assert torch.equal(tokens[False], tokens[True])
    steps = shared_prefix._HELD[adapter.model].graphs.values()
    assert steps and all(step.graph is not None for step in steps)
    shared_prefix.release(adapter.model)
    assert adapter.model not in shared_prefix._HELD


def test_decode_rows_rounded_up_give_the_same_tokens(world):
    """With captured steps the decode runs at a rounded-up number of rows (so batches share
    shapes); the extra rows start finished and see only the prefix: the batch's own rows decode
    the tokens they decode without them (eager here, the path a GPU captures)."""
    from fixtures.adapters import shared_prefix

    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:20]
    encoded = encode_questions(adapter, samples)
    rows = len({s.image_id for s in samples})
    assert rows % 8, "the batch's rows are not a multiple of 8 already"
    tokens = {multiple: shared_prefix.generate_packed(adapter.model, adapter.component("language"), adapter.to_device,
                                                      encoded, adapter.model.config.image_token_id,
                                                      adapter.processor.tokenizer.pad_token_id,
                                                      vqav2.GENERATION.max_new_tokens, row_multiple=multiple)[0]
              for multiple in (1, 8)}
    assert torch.equal(tokens[1], tokens[8])
    shared_prefix.release(adapter.model)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="pinned memory and the device's own cast need a GPU; none here"))])
def test_staged_inputs_are_pinned_and_reach_the_device_as_the_unstaged_ones(world, device):
    """The encoding thread casts pixels to the model's dtype (and pins them on a GPU): to_device
    then gives the very tensors it gives from encode's float32 output, cast on the device. A batch
    of distinct images packs without copying its (pinned) pixels."""
    from fixtures.adapters import shared_prefix

    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device(device), "bfloat16", ROOT)
    samples = vqav2.load_official(world / "vqav2", "val2014")
    chosen = list({s.image_id: s for s in samples}.values())[:6]   # distinct images
    encoded = encode_questions(adapter, chosen)
    staged = adapter.staged(encoded)
    assert encoded["pixel_values"].dtype == torch.float32 and staged["pixel_values"].dtype == torch.bfloat16
    assert staged["pixel_values"].is_pinned() == (device == "cuda")
    assert staged["input_ids"].dtype == encoded["input_ids"].dtype
    plain, ready = adapter.to_device(encoded), adapter.to_device(staged)
    assert plain.keys() == ready.keys() and all(torch.equal(plain[key], ready[key]) for key in plain)
    batch = shared_prefix.pack(staged["input_ids"], staged["attention_mask"], staged["pixel_values"],
                               adapter.model.config.image_token_id, adapter.processor.tokenizer.pad_token_id)
    assert batch.pixels is staged["pixel_values"]


def test_the_packed_decode_reads_whether_all_finished_one_step_late():
    """The decode loop stops on the flag recorded before the last one, so the host never waits
    for the step it has just queued; the one step too many writes only pad tokens."""
    from fixtures.adapters.shared_prefix import _FinishedOneStepLate

    finished = _FinishedOneStepLate(torch.device("cpu"))
    seen = []
    for done in ([[False, True]], [[True, True]], [[True, True]]):
        seen.append(finished.all_done_a_step_ago())
        finished.record(torch.tensor(done))
    seen.append(finished.all_done_a_step_ago())
    assert seen == [False, False, False, True]


def test_the_packed_path_sends_everything_before_the_prefill(world, monkeypatch):
    """On a GPU a copy from the host in mid-call waits for the queued prefill, and the device then
    idles while the host launches the next phase (the H100 profile: 180 ms of a 0.53 s batch).
    Every copy to the device (inputs, the questions' lengths) comes before the first forward."""
    from fixtures.adapters import shared_prefix

    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", ROOT)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:20]
    encoded = encode_questions(adapter, samples)
    events = []
    real_lengths = shared_prefix.PackedBatch.lengths_on
    monkeypatch.setattr(shared_prefix.PackedBatch, "lengths_on",
                        lambda self, device: events.append("send") or real_lengths(self, device))
    adapter.model.register_forward_pre_hook(lambda *a: events.append("forward"))
    sent = lambda inputs: events.append("send") or adapter.to_device(inputs)   # noqa: E731
    out, _ = shared_prefix.generate_packed(adapter.model, adapter.component("language"), sent, encoded,
                                           adapter.model.config.image_token_id, adapter.processor.tokenizer.pad_token_id,
                                           vqav2.GENERATION.max_new_tokens)
    assert out.shape == (20, vqav2.GENERATION.max_new_tokens)
    first_forward = events.index("forward")
    assert "send" in events[:first_forward] and "send" not in events[first_forward:]


def test_packing_groups_questions_by_image_and_declines_where_prefixes_differ():
    from fixtures.adapters.shared_prefix import pack

    image, pad = 9, 0
    # Left-padded rows: [pad..] [1 image image] [question]; rows 0 and 2 show the same image.
    ids = torch.tensor([[0, 0, 1, 9, 9, 5, 6], [0, 1, 9, 9, 7, 7, 7], [1, 9, 9, 8, 8, 8, 8]])
    mask = (ids != 0).long()
    pixels = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.zeros(3, 2, 2)])
    batch = pack(ids, mask, pixels, image, pad)
    assert batch.prefix.tolist() == [1, 9, 9] and torch.equal(batch.pixels, pixels[:2])
    assert batch.image_of.tolist() == [0, 1, 0] and batch.slot_of.tolist() == [0, 0, 1]
    # One row per image, one block per question (width: the longest question), right-aligned.
    assert batch.width == 4 and batch.decode_start == 3 + 2 * 4
    assert batch.ids.tolist() == [[0, 0, 5, 6, 8, 8, 8, 8], [0, 7, 7, 7, 0, 0, 0, 0]]
    assert batch.lengths.tolist() == [[2, 4], [3, 0]]
    distinct = pack(ids[:2], mask[:2], pixels[:2], image, pad)              # no repeat: a row per question
    assert distinct.slot_of.tolist() == [0, 0] and distinct.ids.tolist() == [[0, 5, 6], [7, 7, 7]]
    other = ids.clone()
    other[2, 0] = 2                                                         # other prefix
    assert pack(other, (other != 0).long(), pixels, image, pad) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_are_the_same_only_when_every_pixel_bit_is(dtype):
    """pack's image grouping: as exact as comparing every row's bytes, though it compares in full
    only rows whose sampled values agree (a difference between the samples still splits them)."""
    from fixtures.adapters.shared_prefix import same_images
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, 40, 40, generator=g).to(dtype) for _ in range(2))
    between = a.clone()
    between.view(-1)[1] += 1      # not among the 16 sampled values (every 300th)
    zero, negative_zero = a.clone(), a.clone()
    zero.view(-1)[7], negative_zero.view(-1)[7] = 0.0, -0.0   # equal values, other bits
    rows = torch.stack([a, b, a, between, b, zero, negative_zero, zero])
    first_rows, image_of = same_images(rows, samples=16)
    assert first_rows == [0, 1, 3, 5, 6] and image_of == [0, 1, 0, 2, 1, 3, 4, 3]
    by_bytes: dict[bytes, int] = {}
    expected = [by_bytes.setdefault(row.view(torch.uint8).numpy().tobytes(), len(by_bytes)) for row in rows]
    assert image_of == expected


def test_packed_masks_and_positions_keep_each_question_to_itself():
    """A question's tokens see the prefix and their own earlier tokens, pads only the prefix; at
    decode step t a question sees its own steps up to t; positions continue the unshared prompt's."""
    from fixtures.adapters.shared_prefix import decode_masks, pack, question_mask, question_positions

    ids = torch.tensor([[1, 9, 5, 6], [1, 9, 7, 0], [1, 9, 8, 8]])
    ids[1] = torch.tensor([0, 1, 9, 7])
    pixels = torch.stack([torch.zeros(1), torch.zeros(1), torch.ones(1)])
    batch = pack(ids, (ids != 0).long(), pixels, 9, 0)        # image 0: questions [5 6] and [7]
    assert batch.ids.tolist() == [[5, 6, 0, 7], [8, 8, 0, 0]]
    seen = question_mask(batch, "cpu")[:, 0]                  # (rows, 4 question columns, 6 columns)
    assert seen[0].int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],   # 5, then 6
                                      [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1]]   # pad, then 7
    assert seen[1, 2:].int().tolist() == [[1, 1, 0, 0, 0, 0]] * 2            # an empty block: prefix only
    assert question_positions(batch, "cpu").tolist() == [[2, 3, 2, 2], [2, 3, 2, 2]]
    fixed, own_steps, step = decode_masks(batch, 10, "cpu")
    assert step.tolist() == [-1] * 6 + [0, 0, 1, 1]
    at_step_1 = (fixed | (own_steps & (step <= 1)))[0, 0]
    assert at_step_1.int().tolist() == [[1, 1, 1, 1, 0, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1, 0, 1, 0, 1]]


def test_blip2_beam_search_batched_matches_batch_size_one(world):
    # LAVIS decodes BLIP-2 with 5 beams; the grid asks for it per model. Batched beams must give
    # what one question at a time gives, as greedy does.
    adapter = load_adapter("b", "blip2", "fixtures/tiny/blip2-tiny", torch.device("cpu"), "float32", ROOT)
    beams = replace(vqav2.GENERATION, num_beams=5)
    samples = vqav2.load_official(world / "vqav2", "val2014")[:16]
    one = vqav2.evaluate(adapter, samples, batch_size=1, progress=False, generation=beams)
    many = vqav2.evaluate(adapter, samples, batch_size=16, progress=False, generation=beams)
    assert [s["prediction"] for s in one.samples] == [s["prediction"] for s in many.samples]
