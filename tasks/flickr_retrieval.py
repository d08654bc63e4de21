"""Flickr30k image-text retrieval (1K test) with BLIP-2's ITC ranking and ITM re-ranking.

Sources (no HF schema is maintained for it; use --data-root):
- the Karpathy split under a root: dataset_flickr30k.json, images at flickr30k-images/{filename};
- LAVIS's annotations under a root: flickr30k_{split}.json, [{image, caption}] with caption a list
  (val/test) or one string per record (train), images at {image} relative to the root.
When both are present the Karpathy file wins.

The adapter answers `retrieval` requests (tasks/requests.py: Retrieval, BLIP-2's retrieval model:
ViT + Q-Former, no LLM): image_embeddings, text_embeddings, and itm_scores of aligned pairs;
evaluate passes one image repeated for several texts per itm_scores call, so an adapter may
encode it once. An adapter that implements SharedImageSide (the image side once per image:
the protocol re-scores up to k_test pairs per image and per text, so re-running the vision
tower per pair costs more than everything else together) is evaluated through it instead, its
ITM pairs batched across images. Both paths must give the same scores
(tests/test_flickr_retrieval.py checks it bit for bit).

Metrics (percent): txt_r1/5/10 image->text (an image is a hit at K if any of its captions ranks in
its top K), img_r1/5/10 text->image, txt_r_mean, img_r_mean, r_mean (primary).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tasks.base import (DataError, DataMissing, LazyImage, PhaseClock, TaskResult, batched, karpathy_sentences, open_image, read_json,
                        require, seeded_indices)
from tasks.registry import TaskDef, register_task
from tasks.requests import Retrieval, SharedImageSide

NAME = "flickr_retrieval"
PRIMARY_METRIC = "r_mean"
KARPATHY_FILE = "dataset_flickr30k.json"
RECALL_AT = (1, 5, 10)
PAIR_MEMORY_HEADROOM = 0.8   # of free memory for ITM pair batches: fragmentation, longer texts later
MAX_PAIR_BATCH = 4096


@dataclass
class FlickrImage(LazyImage):
    image_id: str
    captions: list[str]
    image_source: str
    _load: Callable[[], Image.Image]


@dataclass
class RetrievalSet:
    """Images with their captions, and the flat text list the metric ranks.

    Indexable like a list of images, so a seeded subset ([data[i] for i in keep]) is a plain list
    that evaluate turns back into a RetrievalSet."""
    images: list[FlickrImage]
    texts: list[str] = field(init=False)
    txt2img: list[int] = field(init=False)
    img2txt: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.texts, self.txt2img, self.img2txt = [], [], []
        for i, image in enumerate(self.images):
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(image.captions))))
            self.texts.extend(image.captions)
            self.txt2img.extend([i] * len(image.captions))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> FlickrImage:
        return self.images[index]


# -- metric ------------------------------------------------------------------------------------
def _as_scores(sim: Any) -> np.ndarray:
    scores = sim.detach().float().cpu().numpy() if isinstance(sim, torch.Tensor) else np.asarray(sim, float)
    # A NaN compares false with everything and would rank first; a broken model must rank last.
    return np.where(np.isnan(scores), -np.inf, scores)


def _i2t_ranks(scores: np.ndarray, img2txt: list[list[int]]) -> np.ndarray:
    """0-based rank of each image's best caption: how many wrong texts score at least as high
    (ties count against the model, so a constant score never looks like a hit)."""
    correct = np.zeros(scores.shape, dtype=bool)
    for i, texts in enumerate(img2txt):
        correct[i, texts] = True
    best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
    return ((scores >= best) & ~correct).sum(axis=1)


def _t2i_ranks(scores: np.ndarray, txt2img: list[int]) -> np.ndarray:
    """0-based rank of each text's image among all images, ties against the model."""
    columns = np.arange(scores.shape[1])
    own = scores[txt2img, columns]
    correct = np.zeros(scores.shape, dtype=bool)
    correct[txt2img, columns] = True
    return ((scores >= own[None, :]) & ~correct).sum(axis=0)


def _recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    recalls = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in RECALL_AT}
    recalls[f"{prefix}_r_mean"] = sum(recalls.values()) / len(RECALL_AT)
    return recalls


def retrieval_recalls(sim: Any, txt2img: list[int], img2txt: list[list[int]],
                      sim_t2i: Any = None) -> dict[str, float]:
    """Recall@1/5/10 both ways from an n_images x n_texts score matrix (numpy or torch).

    sim_t2i, when given, is the matrix the text->image direction ranks (ITM re-ranking scores
    each direction's candidates separately); otherwise sim serves both directions."""
    i2t = _as_scores(sim)
    t2i = i2t if sim_t2i is None else _as_scores(sim_t2i)
    expected = (len(img2txt), len(txt2img))
    if i2t.shape != expected or t2i.shape != expected:
        raise ValueError(f"retrieval_recalls: scores must be n_images x n_texts = {expected}, "
                         f"got {i2t.shape} and {t2i.shape}")
    metrics = {**_recalls(_i2t_ranks(i2t, img2txt), "txt"), **_recalls(_t2i_ranks(t2i, txt2img), "img")}
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


# -- loaders -----------------------------------------------------------------------------------
def load_official(root: Path, split: str) -> RetrievalSet:
    """The Karpathy file when present, else LAVIS's flickr30k_{split}.json."""
    root = Path(root)
    karpathy, lavis = root / KARPATHY_FILE, root / f"flickr30k_{split}.json"
    if karpathy.is_file():
        images = _load_karpathy(karpathy, root, split)
    elif lavis.is_file():
        images = _load_lavis(lavis, root)
    else:
        raise DataMissing(f"flickr_retrieval: file not found: {karpathy} or {lavis}")
    return RetrievalSet(images)


def _load_karpathy(path: Path, root: Path, split: str) -> list[FlickrImage]:
    data = read_json(path)
    require(data, ["images"], str(path))
    images = []
    for i, entry in enumerate(data["images"]):
        require(entry, ["filename", "split", "sentences"], f"{path}: images[{i}]")
        if entry["split"] != split:
            continue
        captions = karpathy_sentences(entry, f"{path}: images[{i}]")
        image = root / "flickr30k-images" / entry["filename"]
        images.append(FlickrImage(entry["filename"], captions, str(image), open_image(image)))
    if not images:
        raise DataError(f"{path}: no images with split {split!r}")
    return images


def _load_lavis(path: Path, root: Path) -> list[FlickrImage]:
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of {{image, caption}} records")
    captions: dict[str, list[str]] = {}  # insertion-ordered: images keep the file's order
    for i, record in enumerate(records):
        require(record, ["image", "caption"], f"{path}[{i}]")
        caption = record["caption"]
        captions.setdefault(record["image"], []).extend([caption] if isinstance(caption, str) else caption)
    empty = [name for name, texts in captions.items() if not texts]
    if empty:
        raise DataError(f"{path}: no captions for image {empty[0]}")
    if not captions:
        raise DataError(f"{path}: no records")
    return [FlickrImage(Path(name).name, texts, str(root / name), open_image(root / name))
            for name, texts in captions.items()]


def subset(data: RetrievalSet, limit: int, seed: int) -> RetrievalSet:
    """`limit` whole images (with all their captions), seeded, in file order. Recall grows as the
    gallery shrinks: compare only runs of the same limit."""
    if limit >= len(data.images):
        return data
    return RetrievalSet([data.images[i] for i in seeded_indices(len(data.images), limit, seed)])


def load_hf(dataset: str, split: str, revision: str | None = None) -> RetrievalSet:
    raise DataMissing(f"{dataset}: no maintained HF schema for Flickr30k retrieval; use --data-root")


# -- evaluation --------------------------------------------------------------------------------
def shares_image_side(adapter: Retrieval) -> bool:
    return isinstance(adapter, SharedImageSide)


def _text_embeddings(adapter: Any, data: RetrievalSet, batch_size: int, bar: tqdm) -> torch.Tensor:
    texts = torch.cat([adapter.text_embeddings(list(chunk)).float().cpu()
                       for chunk in batched(data.texts, batch_size)])
    bar.update(len(data.texts))
    return texts


def _itc(adapter: Any, data: RetrievalSet, batch_size: int, bar: tqdm) -> torch.Tensor:
    """n_images x n_texts: the best of the image's query embeddings against each text."""
    texts = _text_embeddings(adapter, data, batch_size, bar)
    rows = []
    for chunk in batched(data.images, batch_size):
        queries = adapter.image_embeddings([image.image() for image in chunk]).float().cpu()
        rows.append((queries @ texts.T).amax(dim=1))  # (n, n_query, n_texts) -> (n, n_texts)
        bar.update(len(chunk))
    return torch.cat(rows)


def _image_side(adapter: Any, data: RetrievalSet, batch_size: int) -> torch.Tensor:
    """Every image's features, once: each image is decoded, preprocessed and through the vision
    tower exactly once per evaluation; ITC and ITM both read these rows (left on the device)."""
    return torch.cat([adapter.image_features([image.image() for image in chunk])
                      for chunk in batched(data.images, batch_size)])


def _itc_from_features(adapter: Any, features: torch.Tensor, data: RetrievalSet, batch_size: int,
                       bar: tqdm) -> torch.Tensor:
    texts = _text_embeddings(adapter, data, batch_size, bar)
    rows = []
    for start in range(0, features.shape[0], batch_size):
        queries = adapter.image_embeddings_from_features(features[start:start + batch_size]).float().cpu()
        rows.append((queries @ texts.T).amax(dim=1))
        bar.update(queries.shape[0])
    return torch.cat(rows)


def _itm(adapter: Any, data: RetrievalSet, pairs: torch.Tensor, batch_size: int,
         bar: tqdm) -> torch.Tensor:
    """ITM scores of the listed (image, text) pairs, NaN elsewhere; each image loaded once (the
    per-pair path, for adapters without the shared image side)."""
    itm = torch.full((len(data.images), len(data.texts)), float("nan"))
    for i in range(len(data.images)):
        texts = pairs[i].nonzero().flatten().tolist()
        if texts:
            image = data.images[i].image()
            for chunk in batched(texts, batch_size):
                scores = adapter.itm_scores([image] * len(chunk), [data.texts[t] for t in chunk])
                itm[i, chunk] = scores.float().cpu().reshape(-1)
        bar.update(1)
    return itm


def _pair_batch_size(adapter: Any, features: torch.Tensor, data: RetrievalSet, image_idx: torch.Tensor,
                     text_idx: torch.Tensor, batch_size: int) -> int:
    """batch_size pairs, or on CUDA the most pairs that fit the free memory: one probe batch of
    batch_size pairs is scored and the peak memory it added is charged per pair (the suite's
    batch sizing, fixtures/runtime/batching.py, measured the same way)."""
    if features.device.type != "cuda" or len(image_idx) <= batch_size:
        return batch_size
    device = features.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    adapter.itm_scores_from_features(features, image_idx[:batch_size],
                                     [data.texts[t] for t in text_idx[:batch_size].tolist()])
    torch.cuda.synchronize(device)
    per_pair = max(torch.cuda.max_memory_allocated(device) - before, 1) / batch_size
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(free * PAIR_MEMORY_HEADROOM / per_pair)
    # Beyond a few thousand pairs a batch gains nothing; multiples of 64 keep shapes friendly.
    return max(batch_size, min(MAX_PAIR_BATCH, fit - fit % 64))


def _itm_from_features(adapter: Any, features: torch.Tensor, data: RetrievalSet, pairs: torch.Tensor,
                       batch_size: int, bar: tqdm, pair_batch_size: int | None = None) -> torch.Tensor:
    """The same scores as _itm, from the cached image rows: the listed pairs, in image-major
    order, scored in batches that cross image boundaries (only the Q-Former and ITM head run).
    The scores stay on the device until the end: no copy back per batch, so the host never
    waits for a batch and tokenizes the next one while the GPU scores this one."""
    itm = torch.full((len(data.images), len(data.texts)), float("nan"), device=features.device)
    image_idx, text_idx = pairs.nonzero(as_tuple=True)
    size = pair_batch_size or _pair_batch_size(adapter, features, data, image_idx, text_idx, batch_size)
    # Every batch holds exactly `size` pairs (the last one starts `size` before the end and
    # re-scores a few pairs): a CPU GEMM over very few rows takes another kernel and rounds the
    # ITM head differently in the last bit, so a small remainder batch would not give the
    # scores a full one does; on a GPU it also keeps one shape for the whole loop.
    starts = list(range(0, max(len(image_idx) - size, 0), size)) + [max(len(image_idx) - size, 0)]
    rows_on_device, columns_on_device = image_idx.to(features.device), text_idx.to(features.device)
    for start in starts if len(image_idx) else []:
        images, texts = image_idx[start:start + size], text_idx[start:start + size]
        scores = adapter.itm_scores_from_features(features, images, [data.texts[t] for t in texts.tolist()])
        itm[rows_on_device[start:start + size], columns_on_device[start:start + size]] = scores.float().reshape(-1)
    bar.update(len(data.images))
    return itm.cpu()


def _rerank(itc: torch.Tensor, itm: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """ITM + ITC where `top` marks the re-ranked candidates, -inf elsewhere."""
    return torch.where(top, itm + itc, torch.full_like(itc, float("-inf")))


def evaluate(adapter: Retrieval, data: RetrievalSet | list[FlickrImage], k_test: int = 128,
             batch_size: int = 64, progress: bool = True, pair_batch_size: int | None = None) -> TaskResult:
    """ITC ranks every pair; the top k_test candidates of each image (texts) and of each text
    (images) are re-scored with ITM + ITC; recalls come from those re-ranked scores.

    pair_batch_size: ITM pairs per Q-Former batch on the shared image side (default: batch_size,
    or what fits the free memory on CUDA). The result's `details` carry the seconds of each phase
    (image side, ITC, ITM pairs) and the number of ITM pairs."""
    data = data if isinstance(data, RetrievalSet) else RetrievalSet(list(data))
    if not data.images:
        raise DataError("flickr_retrieval: no images to evaluate")
    if k_test < 1:
        raise ValueError(f"flickr_retrieval: k_test must be >= 1, got {k_test}")
    n_images, n_texts = len(data.images), len(data.texts)
    bar = tqdm(total=2 * n_images + n_texts, desc=NAME, unit="item", disable=not progress, leave=False)
    clock = PhaseClock(getattr(adapter, "device", None))
    shared = shares_image_side(adapter)
    if shared:
        with clock("image_side"):
            features = _image_side(adapter, data, batch_size)
        with clock("itc"):
            itc = _itc_from_features(adapter, features, data, batch_size, bar)
    else:
        with clock("itc"):   # includes the image side: the adapter does not split it off
            itc = _itc(adapter, data, batch_size, bar)
    top_texts = torch.zeros_like(itc, dtype=torch.bool)  # image -> its k_test best texts
    top_texts.scatter_(1, itc.topk(min(k_test, n_texts), dim=1).indices, True)
    top_images = torch.zeros_like(itc, dtype=torch.bool)  # text -> its k_test best images
    top_images.scatter_(0, itc.topk(min(k_test, n_images), dim=0).indices, True)
    # One ITM score per pair that either direction re-ranks.
    pairs = top_texts | top_images
    with clock("itm_pairs"):
        if shared:
            itm = _itm_from_features(adapter, features, data, pairs, batch_size, bar, pair_batch_size)
            del features
        else:
            itm = _itm(adapter, data, pairs, batch_size, bar)
    bar.close()
    i2t, t2i = _rerank(itc, itm, top_texts), _rerank(itc, itm, top_images)
    metrics = retrieval_recalls(i2t, data.txt2img, data.img2txt, sim_t2i=t2i)
    image_ranks = _i2t_ranks(_as_scores(i2t), data.img2txt)
    text_ranks = _t2i_ranks(_as_scores(t2i), data.txt2img)
    # Ranks are 1-based in the logs: 1 means retrieved first.
    logs = [{"direction": "image->text", "image_id": image.image_id, "rank": int(rank) + 1}
            for image, rank in zip(data.images, image_ranks)]
    logs += [{"direction": "text->image", "image_id": data.images[data.txt2img[t]].image_id,
              "text": text, "rank": int(text_ranks[t]) + 1} for t, text in enumerate(data.texts)]
    details = {f"seconds_{phase}": round(sec, 3) for phase, sec in clock.seconds.items()}
    details["itm_pairs"] = int(pairs.sum())
    return TaskResult(metrics, PRIMARY_METRIC, True, n_images, logs, details=details)


TASK = register_task(TaskDef(
    name=NAME, folder="flickr30k", default_split="test", requests=("retrieval",),
    primary_metric=PRIMARY_METRIC, higher_is_better=True, load_official=load_official, load_hf=load_hf,
    evaluate=evaluate, sample_id="image_id", options=MappingProxyType({"k_test": 128}), subset=subset,
    subset_unit="images"))
