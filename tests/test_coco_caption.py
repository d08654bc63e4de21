"""COCO captioning: caption_scores against pycocoevalcap called directly, the Karpathy and
official loaders (well-formed, missing, malformed, unreadable image) and evaluate's plumbing."""
import json
import math

import pytest
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from tests.fakes import EncodesInline
from tasks import coco_caption
from tasks.base import DataError, DataMissing

# Three images so that CIDEr's IDF is not zero for every n-gram (one image would score 0).
REFERENCES = {
    1: ["A man riding a red bike down the street.", "A cyclist on a red bicycle.", "Man rides a bike."],
    2: ["Two dogs play in the snow.", "A pair of dogs running through snow."],
    3: ["A plate of pasta with tomato sauce.", "Spaghetti on a white plate."],
}
PREDICTIONS = {1: "a man rides a red bike", 2: "two dogs in the snow", 3: "a plate with food on it"}
METRIC_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


def direct_scores(predictions, references):
    """The expected values: pycocoevalcap's own steps, as COCOEvalCap.evaluate runs them."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"Bleu_{n + 1}": value for n, value in enumerate(bleu)}
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    return expected


def test_scores_equal_pycocoevalcap_called_directly():
    scores = coco_caption.caption_scores(PREDICTIONS, REFERENCES)
    expected = direct_scores(PREDICTIONS, REFERENCES)
    assert set(scores) == METRIC_KEYS | {"SPICE"}
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-9), name
    assert math.isnan(scores["SPICE"])  # documented as unavailable offline
    # Sanity on the scale: pycocoevalcap's 0..1 Bleu, not percent.
    assert 0 < scores["Bleu_1"] <= 1


def test_a_prediction_equal_to_a_reference_scores_high():
    predictions = {k: refs[0] for k, refs in REFERENCES.items()}
    scores = coco_caption.caption_scores(predictions, REFERENCES)
    assert scores["Bleu_4"] > 0.99  # every n-gram found, lengths equal to the closest reference
    assert scores["CIDEr"] > 1.0


def test_predictions_are_never_counted_as_references():
    # Were predictions appended to the references (mmq's bug), each would match itself exactly
    # and Bleu_4 would be about 1; unrelated words must score about nothing.
    references = {k: list(refs) for k, refs in REFERENCES.items()}
    unrelated = {1: "purple quantum giraffe sings opera", 2: "seven blue violins under water",
                 3: "a theorem about prime numbers"}
    scores = coco_caption.caption_scores(unrelated, references)
    assert scores["Bleu_4"] < 1e-3 and scores["CIDEr"] < 0.05
    assert references == REFERENCES  # the caller's lists are left untouched


def test_mismatched_ids_are_rejected():
    with pytest.raises(ValueError, match="same"):
        coco_caption.caption_scores({1: "x"}, REFERENCES)


def test_missing_java_is_one_clear_error_before_any_generation(monkeypatch):
    monkeypatch.setenv("PATH", "")

    class NeverGenerates:
        def prompt(self, kind, **fields):
            raise AssertionError("evaluate generated captions before checking for Java")

    with pytest.raises(RuntimeError, match="no `java` is on PATH"):
        coco_caption.evaluate(NeverGenerates(), [object()], progress=False)
    with pytest.raises(RuntimeError, match="no `java` is on PATH"):
        coco_caption.caption_scores(PREDICTIONS, REFERENCES)


# -- loaders -----------------------------------------------------------------------------------
def save_image(path, color, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, fmt)


def write_karpathy(root):
    images = [("COCO_val2014_000000000001.jpg", "test", 1), ("COCO_val2014_000000000002.jpg", "restval", 2),
              ("COCO_train2014_000000000003.jpg", "train", 3)]
    entries = []
    for name, split, cocoid in images:
        folder = "train2014" if "train" in name else "val2014"
        save_image(root / folder / name, (cocoid * 60, 0, 0), "JPEG")
        entries.append({"filepath": folder, "filename": name, "split": split, "cocoid": cocoid,
                        "sentences": [{"raw": f"caption {k} of {cocoid}", "tokens": []} for k in range(2)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))


def write_official(root):
    images = [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"},
              {"id": 9, "file_name": "COCO_val2014_000000000009.jpg"}]
    for entry in images:
        save_image(root / "val2014" / entry["file_name"], (0, entry["id"] * 20, 0))
    annotations = [{"image_id": 9, "id": 1, "caption": "a green square"},
                   {"image_id": 7, "id": 2, "caption": "a dark green square"},
                   {"image_id": 9, "id": 3, "caption": "green"}]
    (root / "annotations").mkdir()
    path = root / "annotations" / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_karpathy_split_and_restval(tmp_path):
    write_karpathy(tmp_path)
    test = coco_caption.load_official(tmp_path, "test")
    assert [s.image_id for s in test] == [1]
    assert test[0].references == ["caption 0 of 1", "caption 1 of 1"]
    assert test[0].image_source == str(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    assert test[0].image().size == (8, 6)
    # Karpathy's training set: "train" plus the val2014 images marked "restval".
    assert [s.image_id for s in coco_caption.load_official(tmp_path, "train")] == [2, 3]


def test_official_captions_grouped_by_image(tmp_path):
    write_official(tmp_path)
    samples = coco_caption.load_official(tmp_path, "val")
    assert [s.image_id for s in samples] == [7, 9]
    assert samples[1].references == ["a green square", "green"]
    assert samples[1].image().getpixel((0, 0)) == (0, 180, 0)
    assert [s.image_id for s in coco_caption.load_official(tmp_path, "val2014")] == [7, 9]


def test_karpathy_is_preferred_when_both_exist(tmp_path):
    write_official(tmp_path)
    write_karpathy(tmp_path)
    # The official file would give images 7 and 9 for "val"; the Karpathy file has no "val" image.
    with pytest.raises(DataError, match="dataset_coco.json: no images with split 'val'"):
        coco_caption.load_official(tmp_path, "val2014")
    assert [s.image_id for s in coco_caption.load_official(tmp_path, "test")] == [1]


def test_missing_files_name_both_paths(tmp_path):
    with pytest.raises(DataMissing, match=r"dataset_coco.json or .*annotations/captions_val2014.json"):
        coco_caption.load_official(tmp_path, "val")


def test_malformed_files_name_file_and_field(tmp_path):
    write_karpathy(tmp_path)
    path = tmp_path / "dataset_coco.json"
    data = json.loads(path.read_text())
    del data["images"][1]["sentences"][0]["raw"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dataset_coco.json: images\[1\].sentences\[0\]: missing field\(s\) raw"):
        coco_caption.load_official(tmp_path, "train")
    path.unlink()
    official = write_official(tmp_path)
    data = json.loads(official.read_text())
    del data["annotations"][2]["caption"]
    official.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"captions_val2014.json: annotations\[2\]: missing field\(s\) caption"):
        coco_caption.load_official(tmp_path, "val")


def test_corrupt_image_is_a_data_error_when_read(tmp_path):
    write_official(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000007.jpg").write_bytes(b"not an image")
    sample = coco_caption.load_official(tmp_path, "val")[0]  # loading is lazy: no error yet
    with pytest.raises(DataError, match="COCO_val2014_000000000007.jpg: unreadable image"):
        sample.image()


def test_hf_schema_from_a_local_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"question_id": ["COCO_val2014_000000000042.jpg"], "image": [Image.new("RGB", (4, 4), "blue")],
            "question": ["Provide a one-sentence caption."], "answer": [["a blue square", "blue"]]}
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"),
                                  "answer": datasets.Sequence(datasets.Value("string"))})
    path = tmp_path / "coco.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    [sample] = coco_caption.load_hf(str(path), "val")
    assert sample.image_id == 42 and sample.references == ["a blue square", "blue"]
    assert sample.image().getpixel((0, 0)) == (0, 0, 255)


# -- evaluate ----------------------------------------------------------------------------------
class FixedCaptioner(EncodesInline):
    """Captions by image colour; records each generate call."""

    def __init__(self):
        self.calls = []

    def caption_prompt(self):
        return "Caption:"

    def generate(self, images, prompts, generation):
        self.calls.append((len(images), generation))
        return [f"a square of red {image.getpixel((0, 0))[0]}" for image in images]


def test_evaluate_batches_and_logs(tmp_path):
    write_karpathy(tmp_path)
    adapter = FixedCaptioner()
    samples = coco_caption.load_official(tmp_path, "train") + coco_caption.load_official(tmp_path, "test")
    result = coco_caption.evaluate(adapter, samples, batch_size=2, progress=False)
    assert adapter.calls == [(2, coco_caption.GENERATION), (1, coco_caption.GENERATION)]
    assert set(result.metrics) == METRIC_KEYS  # SPICE left out: see UNAVAILABLE_METRICS
    assert all(isinstance(v, float) for v in result.metrics.values())
    assert (result.primary_metric, result.higher_is_better, result.n_samples) == ("CIDEr", True, 3)
    assert result.samples[0]["image_id"] == 2 and result.samples[0]["prompt"] == "Caption:"
    assert result.samples[0]["prediction"].startswith("a square of red")
    assert result.samples[0]["references"] == ["caption 0 of 2", "caption 1 of 2"]
    assert "SPICE" in coco_caption.UNAVAILABLE_METRICS
