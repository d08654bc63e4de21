"""What every task module provides, and the errors they raise.

A task is data + prompt + metric (as in lm-evaluation-harness): it loads samples, asks the model
adapter for predictions, and scores them. It never knows which quantizer ran.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence


class DataError(Exception):
    """Data that exists but cannot be used: one line naming the file and the problem."""


class DataMissing(Exception):
    """Data that is not there; the suite turns this into a skip naming the path or id."""


@dataclass
class TaskResult:
    metrics: dict[str, float]
    primary_metric: str
    higher_is_better: bool
    n_samples: int
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def primary(self) -> float:
        return self.metrics[self.primary_metric]


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataMissing(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def require(record: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
