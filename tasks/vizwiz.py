"""VizWiz-VQA: questions from blind photographers, some unanswerable, scored with VQA accuracy.

Sources:
- the official files under a root: {split}.json ([{image, question, answers[10]{answer,
  answer_confidence}, answer_type, answerable}]) and images at {split}/{image};
- an HF dataset with the `lmms-lab/VizWiz-VQA` schema (question_id, image, question,
  answers[str], category), by hub id (local HF cache only) or a local parquet/arrow path.

Accuracy is the official VQA rule; "unanswerable" is an ordinary answer string there. On top of
it, unanswerable detection is scored as a binary classifier: positive = the question is not
answerable (answerable == 0), predicted positive = the reply normalizes to "unanswerable".
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from tasks.base import (DataError, LazyImage, TaskResult, generate_replies, load_hf_rows, open_image, percent_by_group,
                        read_json, require)
from tasks.registry import TaskDef, register_task
from tasks.requests import Generation, ShortAnswerOrUnanswerable
from tasks.vqa_eval import answer_format_metrics, normalize_answer, vqa_accuracy

NAME = "vizwiz"
PRIMARY_METRIC = "accuracy"
GENERATION = Generation(max_new_tokens=10)
UNANSWERABLE = "unanswerable"


@dataclass
class VizWizSample(LazyImage):
    image_name: str
    question: str
    answers: list[str]
    answer_type: str
    answerable: bool
    image_source: str
    _load: Callable[[], Image.Image]


def is_unanswerable(prediction: str) -> bool:
    # Normalized like the accuracy, so "Unanswerable." counts the same in both metrics.
    return normalize_answer(prediction) == UNANSWERABLE


def f1_score(predicted: Sequence[bool], labels: Sequence[bool]) -> float:
    """F1 (0..1) of binary predictions; 0 when there is no true positive."""
    true_pos = sum(p and y for p, y in zip(predicted, labels))
    if true_pos == 0:
        return 0.0
    precision = true_pos / sum(predicted)
    recall = true_pos / sum(labels)
    return 2 * precision * recall / (precision + recall)


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the step precision-recall curve (0..1): sum over thresholds of
    (R_k - R_{k-1}) * P_k, one threshold per distinct score from the highest down.

    Tied scores enter together, so the order of tied samples cannot change the result (a stable
    sort would otherwise rank positives first by accident). A generative model's score is
    binary, giving a single operating point (P, R) plus the trivial "everything positive" point:
    AP = R * P + (1 - R) * prevalence.
    """
    if len(scores) != len(labels):
        raise ValueError(f"got {len(scores)} scores but {len(labels)} labels")
    n_pos = sum(bool(y) for y in labels)
    if n_pos == 0:
        raise ValueError("average precision is undefined without positive labels")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ap, true_pos, seen, prev_recall = 0.0, 0, 0, 0.0
    for rank, i in enumerate(order):
        true_pos += bool(labels[i])
        seen += 1
        last_of_tie = rank + 1 == len(order) or scores[order[rank + 1]] != scores[i]
        if last_of_tie:
            recall = true_pos / n_pos
            ap += (recall - prev_recall) * (true_pos / seen)
            prev_recall = recall
    return ap


def _answer_strings(answers: Any, where: str) -> list[str]:
    if not isinstance(answers, list) or not answers:
        # vqa_accuracy needs at least one human answer; an empty list is a data error, not a 0.
        raise DataError(f"{where}: answers must be a non-empty list")
    for j, answer in enumerate(answers):
        if isinstance(answer, dict):
            require(answer, ["answer"], f"{where}.answers[{j}]")
    return [a["answer"] if isinstance(a, dict) else a for a in answers]


def load_official(root: Path, split: str) -> list[VizWizSample]:
    """Read {split}.json (train or val: the test split has no answers)."""
    root = Path(root)
    path = root / f"{split}.json"
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of questions")
    samples = []
    for i, rec in enumerate(records):
        where = f"{path}[{i}]"
        require(rec, ["image", "question", "answers", "answer_type", "answerable"], where)
        image = root / split / rec["image"]
        samples.append(VizWizSample(
            image_name=rec["image"], question=rec["question"],
            answers=_answer_strings(rec["answers"], where), answer_type=rec["answer_type"],
            answerable=bool(rec["answerable"]), image_source=str(image), _load=open_image(image)))
    return samples


def load_hf(dataset: str, split: str, revision: str | None = None) -> list[VizWizSample]:
    """Rows with the lmms-lab/VizWiz-VQA schema, from a hub id or a local parquet/arrow file.

    That schema has no `answerable` flag; its category (the answer type) "unanswerable" stands
    in for answerable == 0. The two agree on almost every official val question, not all.
    """
    rows = load_hf_rows(dataset, split, revision)
    samples = []
    for i, row in enumerate(rows):
        where = f"{dataset}[{i}]"
        require(row, ["question_id", "image", "question", "answers", "category"], where)
        # question_id is the official image name without ".jpg"; restore it so logs match.
        name = str(row["question_id"])
        samples.append(VizWizSample(
            image_name=name if name.endswith(".jpg") else f"{name}.jpg", question=row["question"],
            answers=_answer_strings(list(row["answers"]), where), answer_type=row["category"],
            answerable=bool(row.get("answerable", row["category"] != UNANSWERABLE)),
            image_source=where, _load=lambda img=row["image"]: img.convert("RGB")))
    return samples


def _detection_metrics(predictions: list[str], samples: list[VizWizSample]) -> dict[str, float]:
    # Without an unanswerable question, F1 and AP are undefined: the keys are left out, not 0.
    labels = [not s.answerable for s in samples]
    if not any(labels):
        return {}
    flagged = [is_unanswerable(p) for p in predictions]
    return {"unanswerable_f1": 100.0 * f1_score(flagged, labels),
            "unanswerable_ap": 100.0 * average_precision([float(f) for f in flagged], labels)}


def evaluate(adapter: ShortAnswerOrUnanswerable, samples: list[VizWizSample], batch_size: int = 32,
             progress: bool = True, generation: Generation = GENERATION) -> TaskResult:
    """Short answers (greedy by default) scored with VQA accuracy (in %), overall, per answer type
    (accuracy_type_<type>: the type "unanswerable" would otherwise clash with the next two),
    accuracy_answerable / accuracy_unanswerable by the answerable flag, and unanswerable
    detection (unanswerable_f1, unanswerable_ap, in %)."""
    logs: list[dict[str, Any]] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    by_answerable: dict[str, list[float]] = defaultdict(list)
    replies = generate_replies(adapter, samples, lambda s: adapter.short_answer_or_unanswerable_prompt(s.question),
                               generation, batch_size, NAME, progress)
    for sample, _, prediction in replies:
        score = vqa_accuracy(prediction, sample.answers)
        by_type[sample.answer_type].append(score)
        by_answerable["answerable" if sample.answerable else UNANSWERABLE].append(score)
        logs.append({"image": sample.image_name, "question": sample.question,
                     "prediction": prediction, "answers": sample.answers, "score": score})
    if not logs:
        raise DataError("vizwiz: no samples to evaluate")
    scores = [entry["score"] for entry in logs]
    metrics = {"accuracy": 100.0 * sum(scores) / len(scores)}
    metrics.update(percent_by_group(by_type, "accuracy_type_"))
    metrics.update(percent_by_group(by_answerable, "accuracy_"))
    metrics.update(_detection_metrics([entry["prediction"] for entry in logs], samples))
    metrics.update(answer_format_metrics([e["prediction"] for e in logs], [e["answers"] for e in logs]))
    return TaskResult(metrics, PRIMARY_METRIC, True, len(logs), logs)


TASK = register_task(TaskDef(
    name=NAME, folder="vizwiz", default_split="val", requests=("short_answer_or_unanswerable",),
    primary_metric=PRIMARY_METRIC, higher_is_better=True, load_official=load_official, load_hf=load_hf,
    evaluate=evaluate, diagnostics=("format_failures", "answer_words"), sample_id="image", sample_score="score",
    generation=GENERATION))
