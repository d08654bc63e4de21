"""What every task module provides, and the errors they raise.

A task is data + prompt + metric (as in lm-evaluation-harness): it loads samples, asks the model
adapter for predictions, and scores them. It never knows which quantizer ran.
"""
from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from tasks.requests import Generation


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
    # A task's own numbers about the run, not metrics (retrieval: seconds per phase): recorded as
    # JUnit properties "eval.<key>", never as CSV metric rows.
    details: dict[str, Any] = field(default_factory=dict)

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


def karpathy_sentences(entry: dict, where: str) -> list[str]:
    """The raw captions of one image of a Karpathy-split file (dataset_coco/flickr30k.json)."""
    sentences = []
    for j, sentence in enumerate(entry["sentences"]):
        require(sentence, ["raw"], f"{where}.sentences[{j}]")
        sentences.append(sentence["raw"])
    if not sentences:
        raise DataError(f"{where}: no sentences")
    return sentences


def seeded_indices(n: int, k: int, seed: int) -> list[int]:
    """k of range(n), chosen with a seeded RNG and returned in order: a subset that is the same on
    every machine and keeps the file's order (real files are ordered by image, so never the head)."""
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def seeded_subset(samples: Sequence, limit: int, seed: int) -> Sequence:
    """`limit` samples by seeded_indices; all of them when there are no more than that."""
    if limit >= len(samples):
        return samples
    return [samples[i] for i in seeded_indices(len(samples), limit, seed)]


def whole_image_subset(samples: Sequence, limit: int, seed: int) -> Sequence:
    """`limit` samples drawn image by image (`sample.image_id`): the images in a seeded order, each
    with all its questions, until `limit` (the last image drawn gives only what is left), in file
    order. Questions about one image share its prompt prefix, which the evaluation prefills once
    (share_image_prefix); a subset drawn question by question would ask about one question per
    image and share nothing, so it would measure another speed than the full split does."""
    if limit >= len(samples):
        return samples
    by_image: dict[Any, list[int]] = {}
    for i, sample in enumerate(samples):
        by_image.setdefault(sample.image_id, []).append(i)
    images = sorted(by_image)   # the same images drawn whatever the file's order
    random.Random(seed).shuffle(images)
    chosen: list[int] = []
    for image in images:
        chosen += by_image[image][:limit - len(chosen)]
        if len(chosen) == limit:
            break
    return [samples[i] for i in sorted(chosen)]


def percent_by_group(groups: dict[str, list], prefix: str) -> dict[str, float]:
    """{prefix + group: mean score in %} for each non-empty group name. Names become one token
    for CSVs and marks: "natural science" -> <prefix>natural_science, "yes/no" -> <prefix>yes_no."""
    return {f"{prefix}{re.sub(r'[ +/]', '_', key)}": 100.0 * sum(values) / len(values)
            for key, values in sorted(groups.items()) if key}


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate_replies(adapter: Any, samples: Sequence, prompt_of: Callable[[Any], str], generation: Generation,
                     batch_size: int, desc: str, progress: bool = True,
                     unit: str = "q") -> Iterator[tuple[Any, str, str]]:
    """(sample, prompt, reply decoded with `generation`) for every sample, in order, generated in batches under a
    progress bar: the loop every generative task shares; each task only prompts and scores.

    The next batch is read and encoded (images decoded, resized, normalized, cast and pinned by
    adapter.staged; prompts tokenized) on a background thread while the device generates the
    current one: the same inputs as one after the other, with the host's work off the device's
    critical path. With `generation.length_buckets`, batches are formed from prompts of similar
    token length (less padding to prefill; replies still come back in the samples' order)."""
    # Bucketing needs every prompt up front; otherwise each is formatted with its batch, in the
    # background thread.
    all_prompts = None
    order = list(range(len(samples)))
    if generation.length_buckets:
        all_prompts = [prompt_of(sample) for sample in samples]
        order = length_order(adapter, all_prompts)

    def encode(indices):
        prompts = [all_prompts[i] if all_prompts is not None else prompt_of(samples[i]) for i in indices]
        return prompts, adapter.staged(adapter.encode([samples[i].image() for i in indices], prompts))

    bar = tqdm(total=len(samples), desc=desc, unit=unit, disable=not progress, leave=False)
    batches = list(batched(order, batch_size))
    replies: dict[int, tuple[Any, str, str]] = {}
    next_out = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending = pool.submit(encode, batches[0]) if batches else None
        for index, batch in enumerate(batches):
            prompts, encoded = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(encode, batches[index + 1])
            texts = adapter.generate_encoded(encoded, generation)
            replies.update((i, (samples[i], prompt, text)) for i, prompt, text in zip(batch, prompts, texts))
            bar.update(len(batch))
            while next_out in replies:   # in order: streamed when unsorted, at the end when sorted
                yield replies.pop(next_out)
                next_out += 1
    bar.close()


def length_order(adapter: Any, prompts: list[str]) -> list[int]:
    """Sample indices by their prompt's token count (stable: ties keep the samples' order)."""
    tokenizer = adapter.processor.tokenizer
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    return sorted(range(len(prompts)), key=lengths.__getitem__)


class LazyImage:
    """Mixin for sample dataclasses with a `_load` field: the image is read only when asked for."""

    def image(self) -> Image.Image:
        return self._load()


def open_image(path: Path) -> Callable[[], Image.Image]:
    """A lazy RGB loader: images are read when a batch needs them, and a bad one is one error."""
    def load() -> Image.Image:
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise DataMissing(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: unreadable image ({err})") from None
    return load


def load_hf_rows(dataset: str, split: str, revision: str | None = None, config: str | None = None):
    """Rows of an HF dataset from a hub id (the local HF cache: the suite runs offline) or a local
    .parquet/.arrow file; anything unavailable is DataMissing naming it."""
    import datasets  # imported here: slow to import and only needed for this source

    path = Path(dataset)
    try:
        if path.suffix in (".parquet", ".arrow"):
            if not path.is_file():
                raise DataMissing(f"file not found: {path}")
            return datasets.load_dataset(path.suffix[1:], data_files={split: str(path)}, split=split)
        return datasets.load_dataset(dataset, config, split=split, revision=revision)
    except (FileNotFoundError, ConnectionError) as err:
        raise DataMissing(f"dataset {dataset!r} (split {split}) not available offline: {err}") from None


class PhaseClock:
    """Wall seconds per named phase, summed over its uses (retrieval's image side, ITC and ITM
    pairs; the runtime's model build, snapshot, restore, cache). On CUDA the device is
    synchronized at each boundary, so a phase is charged for its own kernels."""
    def __init__(self, device: Any = None) -> None:
        self.device, self.seconds = device, {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        _synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


def _synchronize(device: Any) -> None:
    # The given device: a worker pinned to cuda:N may not have made it the current one, and
    # touching another GPU would open a context there.
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)
