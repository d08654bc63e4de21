"""VizWiz: the official-format loader (and malformed files), the HF schema, unanswerable
detection metrics worked out by hand, and evaluate with a fake adapter."""
import json

import pytest
from PIL import Image

from tests.fakes import EncodesInline
from tasks import vizwiz
from tasks.base import DataError, DataMissing
from tasks.vizwiz import average_precision, f1_score, is_unanswerable


def _answers(*pairs):
    """_answers(("yes", 3), ("no", 7)) -> 10 official answer records."""
    return [{"answer": a, "answer_confidence": "yes"} for a, n in pairs for _ in range(n)]


def _record(n, answers, answer_type="other", answerable=1):
    return {"image": f"VizWiz_val_{n:08d}.jpg", "question": f"question {n}?", "answers": answers,
            "answer_type": answer_type, "answerable": answerable}


def _write(root, records, split="val"):
    (root / split).mkdir(exist_ok=True)
    for rec in records:
        Image.new("RGB", (6, 4), (len(rec["question"]), 0, 0)).save(root / split / rec["image"])
    (root / f"{split}.json").write_text(json.dumps(records))
    return root


def test_official_loader_reads_answers_and_flags(tmp_path):
    _write(tmp_path, [_record(0, _answers(("red", 10))),
                      _record(1, _answers(("unanswerable", 10)), "unanswerable", 0)])
    samples = vizwiz.load_official(tmp_path, "val")
    assert [s.answers for s in samples] == [["red"] * 10, ["unanswerable"] * 10]
    assert [(s.answer_type, s.answerable) for s in samples] == [("other", True), ("unanswerable", False)]
    assert samples[1].image_name == "VizWiz_val_00000001.jpg"
    assert samples[0].image().size == (6, 4)


def test_malformed_files_name_file_and_field(tmp_path):
    with pytest.raises(DataMissing, match="val.json"):
        vizwiz.load_official(tmp_path, "val")
    rec = _record(0, _answers(("red", 10)))
    del rec["answerable"]
    _write(tmp_path, [_record(1, _answers(("red", 10))), rec])
    with pytest.raises(DataError, match=r"val.json\[1\]: missing field\(s\) answerable"):
        vizwiz.load_official(tmp_path, "val")
    _write(tmp_path, [_record(0, [{"answer_confidence": "yes"}])])
    with pytest.raises(DataError, match=r"val.json\[0\].answers\[0\]: missing field\(s\) answer"):
        vizwiz.load_official(tmp_path, "val")
    _write(tmp_path, [_record(0, [])])
    with pytest.raises(DataError, match=r"val.json\[0\]: answers must be a non-empty list"):
        vizwiz.load_official(tmp_path, "val")
    (tmp_path / "val.json").write_text(json.dumps({"image": "x.jpg"}))
    with pytest.raises(DataError, match="expected a list"):
        vizwiz.load_official(tmp_path, "val")


def test_hf_parquet_schema_maps_category_to_answerable(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question_id": ["VizWiz_val_00000000", "VizWiz_val_00000001"],
            "image": [Image.new("RGB", (3, 3), (7, 7, 7))] * 2, "question": ["a?", "b?"],
            "answers": [["red"] * 10, ["unanswerable"] * 10], "category": ["other", "unanswerable"]}
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")),
                                  "category": datasets.Value("string")})
    path = tmp_path / "vizwiz.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    samples = vizwiz.load_hf(str(path), "val")
    assert [(s.image_name, s.answerable, s.answer_type) for s in samples] == [
        ("VizWiz_val_00000000.jpg", True, "other"), ("VizWiz_val_00000001.jpg", False, "unanswerable")]
    assert samples[0].answers == ["red"] * 10
    assert samples[1].image().getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("reply, expected", [
    ("unanswerable", True), ("Unanswerable.", True), (" UNANSWERABLE\n", True),
    ("not answerable", False), ("unanswerable blur", False), ("", False)])
def test_is_unanswerable(reply, expected):
    assert is_unanswerable(reply) is expected


def test_f1_and_ap_of_binary_scores_by_hand():
    flagged = [True, True, False, False, True, False]
    labels = [True, False, True, False, True, False]
    # TP 2, FP 1, FN 1: P = R = 2/3, F1 = 2/3.
    assert f1_score(flagged, labels) == pytest.approx(2 / 3)
    # Threshold 1: (R, P) = (2/3, 2/3); threshold 0 takes all: (1, 3/6). AP = 4/9 + 1/3 * 1/2.
    assert average_precision([float(f) for f in flagged], labels) == pytest.approx(11 / 18)
    # Nothing flagged: F1 0, and AP falls back to the prevalence.
    assert f1_score([False] * 6, labels) == 0.0
    assert average_precision([0.0] * 6, labels) == pytest.approx(0.5)


def test_ap_with_graded_scores_and_ties():
    # Ranked T F T F: precision 1 at recall 1/2, 2/3 at recall 1 -> 1/2 + 1/3.
    assert average_precision([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == pytest.approx(5 / 6)
    # Same scores in any order give the same AP.
    assert average_precision([0.6, 0.7, 0.8, 0.9], [False, True, False, True]) == pytest.approx(5 / 6)
    # A tie enters as one threshold: a positive sorted first by luck must not earn precision 1.
    assert average_precision([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    assert average_precision([1.0, 1.0], [False, True]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="without positive labels"):
        average_precision([1.0, 0.0], [False, False])


class FakeAdapter(EncodesInline):
    def __init__(self, replies):
        self.replies = replies

    def short_answer_or_unanswerable_prompt(self, question):
        return f"<{question}>"

    def generate(self, images, prompts, generation):
        assert all(isinstance(image, Image.Image) for image in images)
        assert generation == vizwiz.GENERATION
        return [self.replies[prompt[1:-1]] for prompt in prompts]


def _sample(n, answers, answer_type, answerable):
    return vizwiz.VizWizSample(
        image_name=f"img{n}.jpg", question=f"q{n}", answers=answers, answer_type=answer_type,
        answerable=answerable, image_source="mem", _load=lambda: Image.new("RGB", (2, 2)))


def test_evaluate_by_hand():
    samples = [_sample(1, ["red"] * 10, "other", True),                         # "red"          1.0
               _sample(2, ["unanswerable"] * 10, "unanswerable", False),        # "Unanswerable." 1.0, TP
               _sample(3, ["yes"] * 3 + ["no"] * 7, "yes/no", True),            # "yes"          0.9
               _sample(4, ["unanswerable"] * 10, "unanswerable", False),        # "blue"         0.0, FN
               _sample(5, ["dog"] * 10, "other", True)]                         # "unanswerable" 0.0, FP
    adapter = FakeAdapter({"q1": "red", "q2": "Unanswerable.", "q3": "yes", "q4": "blue",
                           "q5": "unanswerable"})
    result = vizwiz.evaluate(adapter, samples, batch_size=2, progress=False)
    expected = {"accuracy": 58.0, "accuracy_type_other": 50.0, "accuracy_type_unanswerable": 50.0,
                "accuracy_type_yes_no": 90.0, "accuracy_answerable": 1.9 / 3 * 100,
                "accuracy_unanswerable": 50.0,
                # P = R = 1/2; AP = 1/2 * 1/2 + (1 - 1/2) * 2/5.
                "unanswerable_f1": 50.0, "unanswerable_ap": 45.0,
                # every reply one word, as long as the longest reference: none fails the format
                "format_failures": 0.0, "answer_words": 1.0}
    assert result.metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value), key
    assert result.primary == pytest.approx(58.0) and result.n_samples == 5
    assert result.samples[2] == {"image": "img3.jpg", "question": "q3", "prediction": "yes",
                                 "answers": ["yes"] * 3 + ["no"] * 7, "score": pytest.approx(0.9)}
    one = vizwiz.evaluate(adapter, samples, batch_size=1, progress=False)
    assert one.metrics == result.metrics


def test_detection_metrics_left_out_without_unanswerable_questions():
    samples = [_sample(1, ["red"] * 10, "other", True)]
    result = vizwiz.evaluate(FakeAdapter({"q1": "unanswerable"}), samples, progress=False)
    assert "unanswerable_f1" not in result.metrics and "unanswerable_ap" not in result.metrics
    assert result.metrics["accuracy"] == 0.0
