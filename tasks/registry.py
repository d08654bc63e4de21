"""The task registry: every task is declared once, by its own module, as a TaskDef.

The grid validates task names and options against it, the runtime loads, subsets and evaluates
through it, the plugin turns its names into marks, and a model family serves a task when its
adapter answers every request kind the task sends (tasks/requests.py). Adding a task means
adding its module to this package (discovered: every module that registers a TaskDef) and its
writer in the embedded world (fixtures/world/); nothing else: the plugin collects its benchmark
as `benchmarks/test_<task>.py` whether or not that file exists (fixtures/runtime/task_modules.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from quantizers.registry import Registry, UnknownEntry
from tasks.base import seeded_subset
from tasks.requests import REQUEST_KINDS, Generation


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
    # (adapter, samples, batch_size, progress, **options) -> TaskResult; a task that generates
    # also takes generation= (a Generation: its defaults below with the grid's overrides)
    evaluate: Callable[..., Any]
    sample_id: str               # the per-sample log field that names a sample across runs
    # The per-sample log field holding the sample's own score (mean over samples = the primary
    # metric), for paired comparisons across runs; None where the metric is corpus-level
    # (CIDEr's IDF, perplexity, retrieval recall over the whole gallery).
    sample_score: str | None = None
    # Task-specific settings a grid may give (name -> default), passed to evaluate().
    options: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # (samples, limit, seed) -> a seeded subset; retrieval keeps whole images with their captions,
    # VQAv2 whole images with their questions. subset_unit names what it draws (the CSV's `subset`).
    subset: Callable[[Sequence, int, int], Sequence] = seeded_subset
    subset_unit: str = "samples"
    # sample -> (question, answer) for a calibration pair; None: not a calibration source.
    calibration_pair: Callable[[Any], tuple[str, str]] | None = None
    # Secondary metrics that say why the primary one moved (the share of replies that fail the
    # answer format, their mean length): the report shows them beside the primary metric.
    diagnostics: tuple[str, ...] = ()
    # Decoding defaults of its generative requests (its own max_new_tokens); None: it sends none.
    generation: Generation | None = None

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.requests if kind not in REQUEST_KINDS]
        if unknown:
            raise ValueError(f"task {self.name}: unknown request kind(s) {unknown}; known: {REQUEST_KINDS}")


class UnknownTask(UnknownEntry):
    """A task name no module of tasks/ registers."""


# Shared code, not tasks: never imported for discovery.
TASKS: Registry[TaskDef] = Registry("task", "tasks", skip=("base", "registry", "requests", "vqa_eval"),
                                    error=UnknownTask)


def register_task(task: TaskDef) -> TaskDef:
    return TASKS.register(task.name, task)
