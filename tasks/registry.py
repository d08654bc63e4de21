"""The task registry: every task is declared once, by its own module, as a TaskDef.

The grid validates task names and options against it, the runtime loads, subsets and evaluates
through it, the plugin turns its names into marks, and a model family serves a task when its
adapter answers every request kind the task sends. Adding a task means adding its module here
(it is found by name: every module of this package that registers a TaskDef), its thin test
module under benchmarks/, and its writer in the embedded world; nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from tasks.base import seeded_subset

# What a task may ask of a model adapter (fixtures/adapters/base.py documents each):
#   short_answer                  open VQA answered in a word or phrase (VQAv2)
#   short_answer_or_unanswerable  the same, allowed to say it cannot tell (VizWiz)
#   caption                       one-sentence caption (COCO)
#   multiple_choice               an option letter from lettered choices (ScienceQA)
#   retrieval                     image/text embeddings and image-text match scores (Flickr30k)
#   text_likelihood               the language model alone, as a causal LM (text perplexity)
REQUEST_KINDS = ("short_answer", "short_answer_or_unanswerable", "caption", "multiple_choice",
                 "retrieval", "text_likelihood")


@dataclass(frozen=True)
class TaskDef:
    name: str
    folder: str                  # its files under a data root and in the embedded world
    default_split: str           # the split the papers report
    requests: tuple[str, ...]    # request kinds sent to the adapter (REQUEST_KINDS)
    primary_metric: str
    higher_is_better: bool
    load_official: Callable[..., Sequence]      # (root, split) -> samples
    load_hf: Callable[..., Sequence]            # (dataset, split, revision) -> samples
    evaluate: Callable[..., Any]                # (adapter, samples, batch_size, progress, **options) -> TaskResult
    sample_id: str               # the per-sample log field that names a sample across runs
    # The per-sample log field holding the sample's own score (mean over samples = the primary
    # metric), for paired comparisons across runs; None where the metric is corpus-level
    # (CIDEr's IDF, perplexity, retrieval recall over the whole gallery).
    sample_score: str | None = None
    # Task-specific settings a grid may give (name -> default), passed to evaluate().
    options: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # (samples, limit, seed) -> a seeded subset; retrieval keeps whole images with their captions.
    subset: Callable[[Sequence, int, int], Sequence] = seeded_subset
    # sample -> (question, answer) for a calibration pair; None: not a calibration source.
    calibration_pair: Callable[[Any], tuple[str, str]] | None = None
    # Secondary metrics that say why the primary one moved (the share of replies that fail the
    # answer format, their mean length): the report shows them beside the primary metric.
    diagnostics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.requests if kind not in REQUEST_KINDS]
        if unknown:
            raise ValueError(f"task {self.name}: unknown request kind(s) {unknown}; known: {REQUEST_KINDS}")


class UnknownTask(KeyError):
    def __str__(self) -> str:
        return self.args[0]


_TASKS: dict[str, TaskDef] = {}
_DISCOVERED: list[bool] = []


def register_task(task: TaskDef) -> TaskDef:
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def _discover() -> None:
    if _DISCOVERED:
        return
    import tasks
    for module in pkgutil.iter_modules(tasks.__path__):
        if module.name not in ("base", "registry"):
            importlib.import_module(f"tasks.{module.name}")
    _DISCOVERED.append(True)


def all_tasks() -> dict[str, TaskDef]:
    _discover()
    return dict(sorted(_TASKS.items()))


def get_task(name: str) -> TaskDef:
    tasks = all_tasks()
    if name not in tasks:
        raise UnknownTask(f"unknown task {name!r}; known: {', '.join(tasks)}")
    return tasks[name]
