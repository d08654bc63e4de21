"""ScienceQA (IMG subset): multiple-choice science questions answered with an option letter.

Sources:
- the official files under a root: problems.json (pid -> {question, choices, answer, hint, image,
  split, subject, ...}), pid_splits.json (split -> [pid]) and images/{split}/{pid}/image.png;
- an HF dataset with the `lmms-lab/ScienceQA` schema (config ScienceQA-IMG: image, question,
  choices, answer, hint, subject, ...), by hub id (local HF cache only) or a local parquet/arrow path.

Only problems with an image are kept: the suite measures vision-language models, and the
published VLM numbers (LLaVA-1.5 66.8) are on this IMG subset.

Context types: the paper's TXT / IMG / NO columns overlap (a problem with both a hint and an
image counts in TXT and in IMG). Here each problem gets one disjoint type instead, so the
per-type accuracies partition the set: "IMG" (image, no hint) and "IMG+TXT" (image and hint),
reported as accuracy_IMG and accuracy_IMG_TXT. The paper's IMG column is the overall accuracy.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from tasks.base import (DataError, LazyImage, TaskResult, generate_replies, load_hf_rows, open_image, percent_by_group,
                        read_json, require)
from tasks.registry import TaskDef, register_task
from tasks.requests import Generation, MultipleChoice

NAME = "scienceqa"
PRIMARY_METRIC = "accuracy"
GENERATION = Generation(max_new_tokens=5)  # a letter, maybe with "." and a few words of the option after it
HF_CONFIG = "ScienceQA-IMG"
_PROBLEM_FIELDS = ("question", "choices", "answer", "hint", "image", "split", "subject")

# A reply that starts with an option letter: the lone letter, "B." / "B. red", or "B red".
# Uppercase only, as in LLaVA's ScienceQA eval: a lowercase "a" is far more often the article.
_LEADING_LETTER = re.compile(r"([A-Z])(?:$|[. ])")
# "The answer is C." anywhere: the phrase in any case (models vary it), the letter uppercase
# like the option labels, and ending a word so that "The answer is Blue" is not option B.
_ANSWER_IS = re.compile(r"(?i:the answer is)\s+([A-Z])\b")
_ANSWER_PHRASE = re.compile(r"the answer is", re.IGNORECASE)


def parse_choice(text: str, n_choices: int) -> int | None:
    """The option index a reply names, or None (the reply then counts as wrong).

    Rules, first in-range letter wins: a reply that is a single letter in either case ("b",
    "B."); a reply starting with an uppercase letter followed by the end, "."
    or a space; otherwise exactly one "the answer is X" in the reply (two are ambiguous).
    A letter past the last option is no answer. A reply starting "A ..." reads as option A even
    when it is prose ("A bird"); the letter-only instruction and 5 new tokens make that rare.
    """
    reply = text.strip()
    # A reply that is one letter and nothing else is unambiguous in either case (lowercasing
    # tokenizers, like the tiny checkpoints' word-level one, answer "b").
    if len(reply.rstrip(".")) == 1 and reply[0].isalpha():
        return _letter_index(reply[0].upper(), n_choices)
    leading = _LEADING_LETTER.match(reply)
    if leading and _letter_index(leading.group(1), n_choices) is not None:
        return _letter_index(leading.group(1), n_choices)
    # Falling through on an out-of-range lead letter lets "I think the answer is B" count.
    if len(_ANSWER_PHRASE.findall(reply)) != 1:
        return None
    stated = _ANSWER_IS.search(reply)
    return _letter_index(stated.group(1), n_choices) if stated else None


def _letter_index(letter: str, n_choices: int) -> int | None:
    index = ord(letter) - ord("A")
    return index if index < n_choices else None


@dataclass
class ScienceQASample(LazyImage):
    pid: str
    question: str
    choices: list[str]
    answer: int
    hint: str
    subject: str
    image_source: str
    _load: Callable[[], Image.Image]

    @property
    def context_type(self) -> str:
        # Every sample has an image (IMG subset); a non-empty hint adds the text context.
        return "IMG+TXT" if self.hint.strip() else "IMG"


def _checked_answer(answer: Any, choices: Any, where: str) -> int:
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: choices must be a list of at least 2 options, got {choices!r}")
    # bool is an int subclass; True as an index would be a silent data bug.
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: answer {answer!r} is not an index into {len(choices)} choices")
    return answer


def load_official(root: Path, split: str) -> list[ScienceQASample]:
    """Problems of one pid_splits.json split (train, val, test, minival, ...) that have an image."""
    root = Path(root)
    p_path, s_path = root / "problems.json", root / "pid_splits.json"
    problems, pid_splits = read_json(p_path), read_json(s_path)
    for path, data in ((p_path, problems), (s_path, pid_splits)):
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object (pid or split -> ...)")
    if split not in pid_splits:
        raise DataError(f"{s_path}: no split {split!r}; it has: {', '.join(pid_splits)}")
    samples = []
    for pid in pid_splits[split]:
        pid = str(pid)
        problem = problems.get(pid)
        if problem is None:
            raise DataError(f"{p_path}: pid {pid} (listed in {s_path} split {split}) not found")
        where = f"{p_path}: pid {pid}"
        require(problem, _PROBLEM_FIELDS, where)
        answer = _checked_answer(problem["answer"], problem["choices"], where)
        if not problem["image"]:
            continue  # text-only problem: outside the IMG subset
        # The problem's own split names the image folder: minival/minitest pids live in val/test.
        image = root / "images" / problem["split"] / pid / problem["image"]
        samples.append(ScienceQASample(
            pid=pid, question=problem["question"], choices=list(problem["choices"]), answer=answer,
            hint=problem["hint"] or "", subject=problem["subject"], image_source=str(image),
            _load=open_image(image)))
    return samples


def load_hf(dataset: str, split: str, revision: str | None = None,
            config: str = HF_CONFIG) -> list[ScienceQASample]:
    """Rows with the lmms-lab/ScienceQA schema, from a hub id (config `config`) or a local
    parquet/arrow file; rows without an image are dropped, as in load_official."""
    split = {"val": "validation"}.get(split, split)   # the hub schema's split names
    rows = load_hf_rows(dataset, split, revision, config=config)
    samples = []
    for i, row in enumerate(rows):
        where = f"{dataset}[{i}]"
        require(row, ["image", "question", "choices", "answer", "hint", "subject"], where)
        if row["image"] is None:
            continue
        samples.append(ScienceQASample(
            pid=str(i), question=row["question"], choices=list(row["choices"]),
            answer=_checked_answer(row["answer"], list(row["choices"]), where),
            hint=row["hint"] or "", subject=row["subject"], image_source=where,
            _load=lambda img=row["image"]: img.convert("RGB")))
    return samples


def evaluate(adapter: MultipleChoice, samples: list[ScienceQASample], batch_size: int = 32,
             progress: bool = True, generation: Generation = GENERATION) -> TaskResult:
    """Option letters (greedy by default) for every sample; accuracy (in %) overall, per subject, per
    context type, the share of replies naming no option (parse_failures, in %: the answer format's
    failures) and the replies' mean length in words (answer_words)."""
    logs: list[dict[str, Any]] = []
    by_subject: dict[str, list[bool]] = defaultdict(list)
    by_context: dict[str, list[bool]] = defaultdict(list)
    replies = generate_replies(adapter, samples, lambda s: adapter.multiple_choice_prompt(s.question, s.choices, s.hint),
                               generation, batch_size, NAME, progress)
    for sample, prompt, prediction in replies:
        parsed = parse_choice(prediction, len(sample.choices))
        correct = parsed == sample.answer
        by_subject[sample.subject].append(correct)
        by_context[sample.context_type].append(correct)
        logs.append({"pid": sample.pid, "prompt": prompt, "prediction": prediction,
                     "parsed": parsed, "answer": sample.answer, "correct": correct})
    if not logs:
        raise DataError("scienceqa: no samples to evaluate")
    n = len(logs)
    metrics = {"accuracy": 100.0 * sum(entry["correct"] for entry in logs) / n,
               "parse_failures": 100.0 * sum(entry["parsed"] is None for entry in logs) / n,
               "answer_words": sum(len(entry["prediction"].split()) for entry in logs) / n}
    metrics.update(percent_by_group(by_subject, "accuracy_"))
    metrics.update(percent_by_group(by_context, "accuracy_"))
    return TaskResult(metrics, PRIMARY_METRIC, True, n, logs)


TASK = register_task(TaskDef(
    name=NAME, folder="scienceqa", default_split="test", requests=("multiple_choice",),
    primary_metric=PRIMARY_METRIC, higher_is_better=True, load_official=load_official, load_hf=load_hf,
    evaluate=evaluate, diagnostics=("parse_failures", "answer_words"), sample_id="pid", sample_score="correct",
    generation=GENERATION))
