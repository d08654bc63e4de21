"""VQAv2: open-ended questions scored with the official 10-answer accuracy.

Sources:
- the official files under a root: v2_OpenEnded_mscoco_{subset}_questions.json,
  v2_mscoco_{subset}_annotations.json and {subset}/COCO_{subset}_{image_id:012d}.jpg;
- an HF dataset with the `lmms-lab/VQAv2` schema (question_id, question, answers, image, ...),
  by hub id (needs the user's local HF cache, the suite runs offline) or a local parquet/arrow path.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from tasks.base import (DataError, LazyImage, TaskResult, generate_replies, load_hf_rows, open_image, percent_by_group,
                        read_json, require, whole_image_subset)
from tasks.registry import TaskDef, register_task
from tasks.requests import Generation, ShortAnswer
from tasks.vqa_eval import answer_format_metrics, vqa_accuracy

NAME = "vqav2"
PRIMARY_METRIC = "accuracy"
GENERATION = Generation(max_new_tokens=10)


@dataclass
class VQASample(LazyImage):
    question_id: int
    image_id: int
    question: str
    answers: list[str]
    answer_type: str
    multiple_choice_answer: str
    image_source: str
    _load: Callable[[], Image.Image]


SUBSETS = {"train": "train2014", "val": "val2014", "test": "test2015"}


def load_official(root: Path, subset: str) -> list[VQASample]:
    """Read the official question + annotation files of one split (train, val) or subset (val2014)."""
    root = Path(root)
    subset = SUBSETS.get(subset, subset)
    q_path = root / f"v2_OpenEnded_mscoco_{subset}_questions.json"
    a_path = root / f"v2_mscoco_{subset}_annotations.json"
    questions = read_json(q_path)
    annotations = read_json(a_path)
    require(questions, ["questions"], str(q_path))
    require(annotations, ["annotations"], str(a_path))
    by_id = {}
    for i, ann in enumerate(annotations["annotations"]):
        require(ann, ["question_id", "answers", "multiple_choice_answer"], f"{a_path}: annotations[{i}]")
        by_id[ann["question_id"]] = ann
    samples = []
    for i, q in enumerate(questions["questions"]):
        require(q, ["question_id", "image_id", "question"], f"{q_path}: questions[{i}]")
        ann = by_id.get(q["question_id"])
        if ann is None:
            raise DataError(f"{a_path}: no annotation for question_id {q['question_id']}")
        image = root / subset / f"COCO_{subset}_{q['image_id']:012d}.jpg"
        samples.append(VQASample(
            question_id=q["question_id"], image_id=q["image_id"], question=q["question"],
            answers=[a["answer"] for a in ann["answers"]], answer_type=ann.get("answer_type", ""),
            multiple_choice_answer=ann["multiple_choice_answer"], image_source=str(image),
            _load=open_image(image)))
    return samples


def load_hf(dataset: str, split: str, revision: str | None = None) -> list[VQASample]:
    """Rows with the lmms-lab/VQAv2 schema, from a hub id or a local parquet/arrow file."""
    split = {"val": "validation"}.get(split, split)   # the hub schema's split names
    rows = load_hf_rows(dataset, split, revision)
    samples = []
    for i, row in enumerate(rows):
        require(row, ["question_id", "question", "answers", "image"], f"{dataset}[{i}]")
        answers = [a["answer"] if isinstance(a, dict) else a for a in row["answers"]]
        samples.append(VQASample(
            question_id=row["question_id"], image_id=row.get("image_id", -1), question=row["question"],
            answers=answers,
            answer_type=row.get("answer_type") or "",
            multiple_choice_answer=row.get("multiple_choice_answer") or "",
            image_source=f"{dataset}[{i}]", _load=lambda img=row["image"]: img.convert("RGB")))
    return samples


def evaluate(adapter: ShortAnswer, samples: list[VQASample], batch_size: int = 32,
             progress: bool = True, generation: Generation = GENERATION) -> TaskResult:
    """Short answers (greedy by default) for every sample, scored with the official VQA accuracy (in %)."""
    logs: list[dict[str, Any]] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    replies = generate_replies(adapter, samples, lambda s: adapter.short_answer_prompt(s.question), generation,
                               batch_size, NAME, progress)
    for sample, prompt, prediction in replies:
        score = vqa_accuracy(prediction, sample.answers)
        by_type[sample.answer_type].append(score)
        logs.append({"question_id": sample.question_id, "prompt": prompt,
                     "prediction": prediction, "answers": sample.answers, "score": score})
    if not logs:
        raise DataError("vqav2: no samples to evaluate")
    scores = [entry["score"] for entry in logs]
    metrics = {"accuracy": 100.0 * sum(scores) / len(scores), **percent_by_group(by_type, "accuracy_"),
               **answer_format_metrics([e["prediction"] for e in logs], [e["answers"] for e in logs])}
    return TaskResult(metrics, PRIMARY_METRIC, True, len(logs), logs)


TASK = register_task(TaskDef(
    name=NAME, folder="vqav2", default_split="val", requests=("short_answer",),
    primary_metric=PRIMARY_METRIC, higher_is_better=True, load_official=load_official, load_hf=load_hf,
    evaluate=evaluate, diagnostics=("format_failures", "answer_words"), sample_id="question_id", sample_score="score",
    generation=GENERATION, subset=whole_image_subset, subset_unit="images",
    calibration_pair=lambda sample: (sample.question, sample.multiple_choice_answer)))
