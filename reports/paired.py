"""Paired evidence for a change between two runs: per-sample scores and a bootstrap interval.

Two runs that evaluated the same samples can be compared sample by sample, which removes the
variation between samples from the comparison: the interval of the mean paired difference is
much narrower than the one of two independent means. Each task names its per-sample id and score
fields in its registry entry (TaskDef.sample_id / sample_score); a task whose metric is
corpus-level (CIDEr, perplexity, retrieval recall) has no per-sample score, and compare falls
back to the tolerance alone there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reports.runs import read_jsonl_tolerantly

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# Resamples drawn at once: bounds memory at about this many x n_samples indices.
_CHUNK = 250
# A per-sample score is a fraction (VQA's min(#humans/3, 1), a 0/1 correct) or already in the
# metric's unit; the metric reports either the mean or the mean in percent.
_SCALES = (1.0, 100.0)


@dataclass(frozen=True)
class SampleScores:
    scores: dict[str, float]      # sample id (as text) -> score, in the metric's own unit
    complete: bool                # every sample the CSV row counted is in the log


@dataclass(frozen=True)
class PairedInterval:
    n_paired: int
    mean_delta: float             # head - base, metric units, over the paired samples
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"[{self.low:+.2f}, {self.high:+.2f}]"


def score_fields(task: str) -> tuple[str, str] | None:
    """(sample id field, sample score field) of a registered task, or None when it has none."""
    try:
        from tasks.registry import TASKS, UnknownTask
    except ImportError:   # the reports package used without the tasks package (a copied folder)
        return None
    try:
        definition = TASKS.get(task)
    except UnknownTask:
        return None
    if definition.sample_score is None:
        return None
    return definition.sample_id, definition.sample_score


def read_sample_scores(path: Path, fields: tuple[str, str], value: float,
                       n_samples: int | None) -> tuple[SampleScores | None, str]:
    """The per-sample scores of one logged (model, task, config), scaled to the metric's unit.

    The mean of the scores must reproduce the CSV value (as a fraction or in percent): a log that
    does not is from another run or another metric and is not used. Returns (scores or None, why
    not / what was wrong)."""
    if not path.is_file():
        return None, f"no per-sample log {path}"
    records, problems = read_jsonl_tolerantly(path)
    id_field, score_field = fields
    raw: dict[str, float] = {}
    for record in records:
        score = record.get(score_field)
        if id_field in record and isinstance(score, (int, float)):
            raw[str(record[id_field])] = float(score)   # bool is an int: correct=True reads 1.0
    if not raw:
        return None, "; ".join(problems) or f"{path}: no '{score_field}' per sample"
    complete = n_samples is None or len(raw) == n_samples
    mean = sum(raw.values()) / len(raw)
    scale = min(_SCALES, key=lambda candidate: abs(mean * candidate - value))
    if complete and abs(mean * scale - value) > 1e-6 * max(1.0, abs(value)):
        return None, f"{path}: mean per-sample {score_field} ({mean:.6g}) does not reproduce the CSV value {value:.6g}"
    note = "; ".join(problems)
    return SampleScores({key: score * scale for key, score in raw.items()}, complete), note


def paired_bootstrap(base: SampleScores, head: SampleScores, *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> PairedInterval | None:
    """Percentile bootstrap interval of the mean of (head - base) over the sample ids both runs
    scored; the same seed gives the same interval. None when fewer than two samples pair up."""
    shared = sorted(set(base.scores) & set(head.scores))
    if len(shared) < 2:
        return None
    differences = np.array([head.scores[key] - base.scores[key] for key in shared])
    generator = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        picks = generator.integers(0, len(differences), size=(count, len(differences)))
        means.append(differences[picks].mean(axis=1))
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1 - tail])
    return PairedInterval(len(shared), float(differences.mean()), float(low), float(high))
