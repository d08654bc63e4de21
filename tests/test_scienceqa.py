"""ScienceQA: the reply parser, the official-format loader (IMG filter, splits, malformed files),
the HF schema, and evaluate's metrics against numbers worked out by hand."""
import json

import pytest
from PIL import Image

from tests.fakes import EncodesInline
from tasks import scienceqa
from tasks.base import DataError, DataMissing
from tasks.scienceqa import parse_choice


@pytest.mark.parametrize("reply, n_choices, expected", [
    ("B", 4, 1),
    ("  C\n", 4, 2),                      # adapters strip, but the parser must not rely on it
    ("B.", 4, 1),
    ("B. red", 4, 1),
    ("B red", 4, 1),
    ("The answer is C.", 4, 2),
    ("the ANSWER is A", 2, 0),            # the phrase in any case
    ("I think the answer is B", 3, 1),    # "I " is no option among 3: falls through
    ("The answer is A. The answer is B.", 4, None),   # two statements: ambiguous
    ("The answer is A. No, the answer is A.", 4, None),
    ("The answer is Blue", 4, None),      # a word, not the letter B
    ("E", 4, None),                       # past the last option
    ("The answer is E.", 4, None),
    ("b", 4, 1),                          # a lone letter is unambiguous in either case
    ("b red", 4, None),                   # but a lowercase lead letter may be an article
    ("Blue", 4, None),
    ("", 4, None),
    ("red", 4, None),
])
def test_parse_choice(reply, n_choices, expected):
    assert parse_choice(reply, n_choices) == expected


def _problem(subject="natural science", hint="", image="image.png", split="test", answer=0,
             choices=("red", "blue", "green")):
    return {"question": f"Q {subject} {hint}?", "choices": list(choices), "answer": answer,
            "hint": hint, "image": image, "split": split, "subject": subject, "grade": "grade2"}


def _write(root, problems, pid_splits):
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(pid_splits))
    for pid, problem in problems.items():
        if problem.get("image"):
            folder = root / "images" / problem["split"] / pid
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 6), (int(pid), 0, 0)).save(folder / "image.png")
    return root


@pytest.fixture
def tiny(tmp_path):
    problems = {"1": _problem(), "2": _problem(image=None), "3": _problem(hint="a hint", answer=2),
                "4": _problem(split="train"), "5": _problem(subject="social science", split="val")}
    return _write(tmp_path, problems, {"train": ["4"], "val": ["5"], "test": ["1", "2", "3"],
                                       "minival": ["5"]})


def test_loader_keeps_image_problems_of_the_split(tiny):
    samples = scienceqa.load_official(tiny, "test")
    assert [s.pid for s in samples] == ["1", "3"]             # pid 2 has no image
    assert [s.context_type for s in samples] == ["IMG", "IMG+TXT"]
    assert samples[1].answer == 2 and samples[1].choices == ["red", "blue", "green"]
    assert samples[0].image().getpixel((0, 0)) == (1, 0, 0)   # its own image, lazily read
    assert [s.pid for s in scienceqa.load_official(tiny, "train")] == ["4"]
    # minival pids keep their images under images/val.
    assert scienceqa.load_official(tiny, "minival")[0].image().getpixel((0, 0)) == (5, 0, 0)


def test_unknown_split_and_missing_files(tiny, tmp_path_factory):
    with pytest.raises(DataError, match="no split 'dev'; it has: train, val, test, minival"):
        scienceqa.load_official(tiny, "dev")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataMissing, match="problems.json"):
        scienceqa.load_official(empty, "test")


def test_malformed_problems_name_file_pid_and_field(tmp_path):
    problem = _problem()
    del problem["subject"]
    _write(tmp_path, {"7": problem}, {"test": ["7"]})
    with pytest.raises(DataError, match=r"problems.json: pid 7: missing field\(s\) subject"):
        scienceqa.load_official(tmp_path, "test")
    _write(tmp_path, {"7": _problem(answer=3)}, {"test": ["7"]})
    with pytest.raises(DataError, match="pid 7: answer 3 is not an index into 3 choices"):
        scienceqa.load_official(tmp_path, "test")
    _write(tmp_path, {"7": _problem()}, {"test": ["7", "8"]})
    with pytest.raises(DataError, match="pid 8 .*pid_splits.json split test.* not found"):
        scienceqa.load_official(tmp_path, "test")
    (tmp_path / "pid_splits.json").write_text("[]")
    with pytest.raises(DataError, match="pid_splits.json: expected a JSON object"):
        scienceqa.load_official(tmp_path, "test")


def test_hf_parquet_schema_keeps_image_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    image = Image.new("RGB", (4, 4), (9, 9, 9))
    rows = {"image": [image, None], "question": ["q0", "q1"], "choices": [["x", "y"], ["x", "y"]],
            "answer": [1, 0], "hint": ["", "h"], "subject": ["language science"] * 2}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.Value("int8"), "hint": datasets.Value("string"),
                                  "subject": datasets.Value("string")})
    path = tmp_path / "sqa.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    samples = scienceqa.load_hf(str(path), "test")
    assert [(s.question, s.answer, s.choices) for s in samples] == [("q0", 1, ["x", "y"])]
    assert samples[0].image().getpixel((0, 0)) == (9, 9, 9)
    with pytest.raises(DataMissing, match="missing.parquet"):
        scienceqa.load_hf(str(tmp_path / "missing.parquet"), "test")


class FakeAdapter(EncodesInline):
    """Replies with a fixed text per question and records what it was given."""

    def __init__(self, replies):
        self.replies = replies
        self.batches = []

    def multiple_choice_prompt(self, question, choices, hint=""):
        return f"{hint}|{question}|{'/'.join(choices)}"

    def generate(self, images, prompts, generation):
        assert all(isinstance(image, Image.Image) for image in images)
        assert generation == scienceqa.GENERATION
        self.batches.append(len(prompts))
        return [self.replies[prompt.split("|")[1]] for prompt in prompts]


def _sample(pid, subject, hint, answer):
    return scienceqa.ScienceQASample(
        pid=pid, question=f"q{pid}", choices=["a", "b", "c", "d"], answer=answer, hint=hint,
        subject=subject, image_source="mem", _load=lambda: Image.new("RGB", (2, 2)))


def test_evaluate_counts_by_hand():
    samples = [_sample("1", "natural science", "", 0),      # "A"                -> right
               _sample("2", "natural science", "hint", 1),  # "The answer is C." -> wrong
               _sample("3", "social science", "", 2),       # "C. green"         -> right
               _sample("4", "language science", "hint", 1)]  # "maybe"           -> unparsed
    adapter = FakeAdapter({"q1": "A", "q2": "The answer is C.", "q3": "C. green", "q4": "maybe"})
    result = scienceqa.evaluate(adapter, samples, batch_size=3, progress=False)
    assert adapter.batches == [3, 1]
    assert result.metrics == {
        "accuracy": 50.0, "parse_failures": 25.0, "answer_words": (1 + 4 + 2 + 1) / 4,
        "accuracy_language_science": 0.0, "accuracy_natural_science": 50.0,
        "accuracy_social_science": 100.0,
        "accuracy_IMG": 100.0, "accuracy_IMG_TXT": 0.0}
    assert result.primary == 50.0 and result.n_samples == 4
    assert [(s["parsed"], s["correct"]) for s in result.samples] == [
        (0, True), (2, False), (2, True), (None, False)]
    assert result.samples[1]["prompt"] == "hint|q2|a/b/c/d"
    assert set(result.samples[0]) == {"pid", "prompt", "prediction", "parsed", "answer", "correct"}


def test_evaluate_without_samples_is_an_error():
    with pytest.raises(DataError, match="no samples"):
        scienceqa.evaluate(FakeAdapter({}), [], progress=False)


def test_length_buckets_give_the_same_replies_in_the_same_order(tmp_path, monkeypatch):
    # ScienceQA's prompts vary with their hints: batches of similar length pad less, and the
    # replies must still be those of the unsorted batches, each with its own sample.
    from dataclasses import replace
    from pathlib import Path

    import torch

    from fixtures.adapters import load_adapter
    from fixtures.world.generate import generate_world

    root = Path(__file__).resolve().parent.parent
    generate_world(tmp_path / "world", layout={"scienceqa": {"val": 24}}, progress=False)
    samples = scienceqa.load_official(tmp_path / "world" / "scienceqa", "val")
    adapter = load_adapter("t", "llava", "fixtures/tiny/llava-tiny", torch.device("cpu"), "float32", root)
    plain = scienceqa.evaluate(adapter, samples, batch_size=8, progress=False)

    widths = []
    encode = adapter.encode
    monkeypatch.setattr(adapter, "encode", lambda images, texts: widths.append(
        [len(ids) for ids in adapter.processor.tokenizer(texts)["input_ids"]]) or encode(images, texts))
    bucketed = scienceqa.evaluate(adapter, samples, batch_size=8, progress=False,
                                  generation=replace(scienceqa.GENERATION, length_buckets=True))
    assert [s["prediction"] for s in bucketed.samples] == [s["prediction"] for s in plain.samples]
    assert [s["pid"] for s in bucketed.samples] == [s["pid"] for s in plain.samples] == [s.pid for s in samples]
    flat = [n for batch in widths for n in batch]
    assert flat == sorted(flat) and len(set(flat)) > 1      # batches by length, and lengths differ
