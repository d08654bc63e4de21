"""COCO captioning: one greedy caption per image, scored with the COCO caption metrics.

Sources:
- the Karpathy split under a root: dataset_coco.json, images at {filepath}/{filename};
  split "train" also takes "restval", as Karpathy's training set does;
- the official files under a root: annotations/captions_{subset}.json, images at
  {subset}/{file_name} (subset val2014 for split "val", train2014 for "train");
  when both are present the Karpathy file wins (the literature reports its test split);
- an HF dataset with the `lmms-lab/COCO-Caption` schema (question_id = the image's file name,
  image, answer = its captions), by hub id (local HF cache only) or a local parquet/arrow path.

Metrics: pycocoevalcap after its PTBTokenizer (both need Java): Bleu_1..Bleu_4, METEOR, ROUGE_L,
CIDEr, on pycocoevalcap's own scale: 0..1, and CIDEr about 1 for a good captioner, so the
literature's "CIDEr 145.8" is 1.458 here. CIDEr's IDF comes from the evaluated references:
compare it only between runs on the same images. SPICE is not computed (UNAVAILABLE_METRICS).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable

import psutil
from PIL import Image

from tasks.base import (DataError, DataMissing, LazyImage, TaskResult, generate_replies, karpathy_sentences, load_hf_rows,
                        open_image, read_json, require)
from tasks.registry import TaskDef, register_task
from tasks.requests import Caption, Generation

NAME = "coco_caption"
PRIMARY_METRIC = "CIDEr"
GENERATION = Generation(max_new_tokens=30)

KARPATHY_FILE = "dataset_coco.json"
# Splits as the grid names them -> the official subset; the subset names are accepted too.
OFFICIAL_SUBSETS = {"val": "val2014", "train": "train2014", "val2014": "val2014", "train2014": "train2014"}
KARPATHY_SPLITS = {"val2014": "val", "train2014": "train"}
# Karpathy's training set is its "train" plus the "restval" images taken from val2014.
KARPATHY_EXTRA = {"train": {"restval"}}

# Reported by caption_scores as NaN and left out of TaskResult.metrics; the caller records skips.
UNAVAILABLE_METRICS = {"SPICE": "needs Stanford CoreNLP, downloaded at first use (offline here)"}


@dataclass
class CaptionSample(LazyImage):
    image_id: Hashable
    references: list[str]
    image_source: str
    _load: Callable[[], Image.Image]


# -- metric ------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    # The Java tokenizer works line by line: a stray \r or \u2028 would shift every later caption.
    return " ".join(text.split())


def require_java() -> None:
    """Fail before any caption is generated: PTBTokenizer and METEOR start `java` subprocesses."""
    if shutil.which("java") is None:
        raise RuntimeError("coco_caption: pycocoevalcap's PTBTokenizer and METEOR run Java, and no "
                           "`java` is on PATH. Install a Java runtime (Debian: apt-get install "
                           "default-jre-headless) or deselect the task with -m 'not coco_caption'.")


def _meteor_score(meteor_class, gts, res) -> float:
    """METEOR from a Java child that is ended whatever happens. pycocoevalcap's Meteor holds a
    lock while it waits for the child and releases it only on success; its __del__ takes the same
    lock, so after a Ctrl-C or SIGTERM in the wait, collecting the object hung the process with
    the child alive (until a second Ctrl-C). Here the child is killed in any case and __del__
    is given a free lock, so it has nothing left to wait for."""
    meteor = meteor_class()
    try:
        return float(meteor.compute_score(gts, res)[0])
    finally:
        _end_child(meteor.meteor_p)
        meteor.lock = threading.Lock()


def _end_child(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:   # a killed process that is not reaped in 10 s: leave it to init
        pass
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:       # a pipe the dead child left half-written
                pass


@contextlib.contextmanager
def _java_children_ended():
    """On an interruption (Ctrl-C, SIGTERM turned into one by the runtime, any error), kill the
    Java children this process started for scoring (PTBTokenizer's, METEOR's), so none outlives
    the run. Only `java` processes: xdist workers are children of the main process too."""
    try:
        yield
    except BaseException:
        for child in psutil.Process().children(recursive=True):
            try:
                if "java" in os.path.basename((child.cmdline() or [""])[0]):
                    child.kill()
            except psutil.Error:     # already gone, or not ours to inspect
                continue
        raise


def caption_scores(predictions: dict[Hashable, str], references: dict[Hashable, list[str]]) -> dict:
    """COCO caption metrics of one prediction per image against that image's references.

    Predictions and references are tokenized in separate calls and never mixed: appending the
    predictions to the references (as mmq did) inflates every score.
    """
    from pycocoevalcap.bleu.bleu import Bleu  # imported here: only this metric needs them
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    if not predictions or set(predictions) != set(references):
        raise ValueError("caption_scores: predictions and references must cover the same, non-empty "
                         "set of image ids")
    empty = [image_id for image_id, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"caption_scores: no references for image id(s) {empty[:5]}")
    tokenizer = PTBTokenizer()
    with _java_children_ended():
        gts = tokenizer.tokenize({k: [{"caption": _one_line(c)} for c in refs] for k, refs in references.items()})
        res = tokenizer.tokenize({k: [{"caption": _one_line(predictions[k])}] for k in references})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
        scores["METEOR"] = _meteor_score(Meteor, gts, res)
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores.update({name: float("nan") for name in UNAVAILABLE_METRICS})
    return scores


# -- loaders -----------------------------------------------------------------------------------
def load_official(root: Path, split: str) -> list[CaptionSample]:
    """The Karpathy file when present, else the official captions file of the split's subset."""
    root = Path(root)
    karpathy = root / KARPATHY_FILE
    if karpathy.is_file():
        return _load_karpathy(karpathy, root, KARPATHY_SPLITS.get(split, split))
    subset = OFFICIAL_SUBSETS.get(split)
    official = root / "annotations" / f"captions_{subset}.json" if subset else None
    if official is None or not official.is_file():
        looked = f"{karpathy} or {official}" if official else f"{karpathy} (split {split!r} is Karpathy-only)"
        raise DataMissing(f"coco_caption: file not found: {looked}")
    return _load_captions_file(official, root, subset)


def _load_karpathy(path: Path, root: Path, split: str) -> list[CaptionSample]:
    data = read_json(path)
    require(data, ["images"], str(path))
    wanted = {split} | KARPATHY_EXTRA.get(split, set())
    samples = []
    for i, entry in enumerate(data["images"]):
        require(entry, ["filepath", "filename", "split", "sentences", "cocoid"], f"{path}: images[{i}]")
        if entry["split"] not in wanted:
            continue
        references = karpathy_sentences(entry, f"{path}: images[{i}]")
        image = root / entry["filepath"] / entry["filename"]
        samples.append(CaptionSample(entry["cocoid"], references, str(image), open_image(image)))
    if not samples:
        raise DataError(f"{path}: no images with split {split!r}")
    return samples


def _load_captions_file(path: Path, root: Path, subset: str) -> list[CaptionSample]:
    data = read_json(path)
    require(data, ["images", "annotations"], str(path))
    captions: dict[Any, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        require(ann, ["image_id", "caption"], f"{path}: annotations[{i}]")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    samples = []
    for i, entry in enumerate(data["images"]):
        require(entry, ["id", "file_name"], f"{path}: images[{i}]")
        if entry["id"] not in captions:
            raise DataError(f"{path}: no caption for image id {entry['id']}")
        image = root / subset / entry["file_name"]
        samples.append(CaptionSample(entry["id"], captions[entry["id"]], str(image), open_image(image)))
    return samples


def _image_id(question_id: Any) -> Any:
    """lmms-lab names each row by its file (COCO_val2014_000000391895.jpg): the number is the id."""
    if isinstance(question_id, str):
        match = re.search(r"(\d+)\.\w+$", question_id)
        return int(match.group(1)) if match else question_id
    return question_id


def load_hf(dataset: str, split: str, revision: str | None = None) -> list[CaptionSample]:
    """Rows with the lmms-lab/COCO-Caption schema, from a hub id or a local parquet/arrow file."""
    rows = load_hf_rows(dataset, split, revision)
    samples = []
    for i, row in enumerate(rows):
        require(row, ["question_id", "image", "answer"], f"{dataset}[{i}]")
        if not row["answer"]:
            raise DataError(f"{dataset}[{i}]: no captions in field answer")
        samples.append(CaptionSample(_image_id(row["question_id"]), list(row["answer"]), f"{dataset}[{i}]",
                                     _load=lambda img=row["image"]: img.convert("RGB")))
    return samples


# -- evaluation --------------------------------------------------------------------------------
def evaluate(adapter: Caption, samples: list[CaptionSample], batch_size: int = 32,
             progress: bool = True, generation: Generation = GENERATION) -> TaskResult:
    """Captions (the adapter's caption prompt; greedy by default) scored with caption_scores."""
    require_java()
    logs: list[dict[str, Any]] = []
    replies = generate_replies(adapter, samples, lambda _: adapter.caption_prompt(), generation,
                               batch_size, NAME, progress, unit="img")
    for sample, prompt, prediction in replies:
        logs.append({"image_id": sample.image_id, "prompt": prompt,
                     "prediction": prediction, "references": sample.references})
    if not logs:
        raise DataError("coco_caption: no samples to evaluate")
    predictions = {entry["image_id"]: entry["prediction"] for entry in logs}
    if len(predictions) != len(logs):
        # Scores are per image: a repeated id would silently drop one of its predictions.
        raise DataError("coco_caption: samples repeat an image_id")
    scores = caption_scores(predictions, {entry["image_id"]: entry["references"] for entry in logs})
    metrics = {name: value for name, value in scores.items() if not math.isnan(value)}
    return TaskResult(metrics, PRIMARY_METRIC, True, len(logs), logs)


TASK = register_task(TaskDef(
    name=NAME, folder="coco", default_split="test", requests=("caption",),
    primary_metric=PRIMARY_METRIC, higher_is_better=True, load_official=load_official, load_hf=load_hf,
    evaluate=evaluate, sample_id="image_id", generation=GENERATION))
