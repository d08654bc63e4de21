"""Flickr30k-1K retrieval at the paper's scale, timed through a tree's own public API (issue 26).

Builds BLIP-2 ITM ViT-g (fixtures/configs/blip2-itm-vit-g-coco, seeded random weights: timings
only, never accuracy), generates a Flickr-style test split with the embedded world's generator
(--images images x 5 captions, by this checkout), and times one tasks.flickr_retrieval.evaluate
of the tree given with --tree (this checkout, or an older one exported to .old/, so both run in
one GPU session) at --k-test. Reports total seconds, seconds per phase (ITC, image side, ITM
pairs), ITM pairs/s and peak GPU memory, one JSON line, also written to --out.

Phases: a tree whose evaluate reports them (TaskResult.details) gives its own split; for an
older tree the adapter's calls are timed instead (ITC = image_embeddings + text_embeddings, its
vision tower included; ITM pairs = itm_scores, the vision tower run per pair included), and
there is no separate image side.

    python benchmarks/perf/retrieval_scale.py --tree . --out new.json                 # 1K, k_test 128
    python benchmarks/perf/retrieval_scale.py --tree .old --out old.json
    python benchmarks/perf/retrieval_scale.py --tree . --images 100 --k-test 16 --out small.json
    python benchmarks/perf/retrieval_scale.py --tree . --device cpu --config fixtures/tiny/blip2-tiny-retrieval \
        --images 20 --k-test 8 --out /tmp/smoke.json                                # CPU smoke, tiny weights

A --config folder holding model.safetensors (the tiny checkpoint) is loaded with its weights
through the tree's adapter; a shipped config folder is built with random weights.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import sys
import time
from pathlib import Path

from full_size import random_init_module   # this script's folder is on sys.path when it runs

REPO = Path(__file__).resolve().parents[2]


def _synchronize(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(adapter, torch, device, names_by_phase: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Wrap the adapter's methods so each call's seconds (device synchronized) add to its phase:
    the per-phase split for trees whose evaluate does not report one. "itm_scores_pairs" counts
    the texts itm_scores was given (one per pair)."""
    seconds = {phase: 0.0 for phase in names_by_phase}
    seconds["itm_scores_pairs"] = 0
    for phase, names in names_by_phase.items():
        for name in names:
            method = getattr(adapter, name)

            @functools.wraps(method)
            def timed(*args, _method=method, _phase=phase, **kwargs):
                _synchronize(torch, device)
                start = time.perf_counter()
                out = _method(*args, **kwargs)
                _synchronize(torch, device)
                seconds[_phase] += time.perf_counter() - start
                if _method.__name__ == "itm_scores":
                    seconds["itm_scores_pairs"] += len(args[1])
                return out
            setattr(adapter, name, timed)
    return seconds


def build_adapter(config_dir: Path, device, dtype):
    """The measured tree's retrieval adapter: tiny weights when the folder has them, else this
    checkout's random-init model of the shipped config."""
    from fixtures.adapters.blip2 import Blip2RetrievalAdapter   # the measured tree's own
    if (config_dir / "model.safetensors").is_file():
        return Blip2RetrievalAdapter.load("perf", str(config_dir), device, str(dtype).removeprefix("torch."))
    model, processor = random_init_module().blip2_model_and_processor(config_dir, device, dtype, retrieval=True)
    return Blip2RetrievalAdapter("perf", model, processor, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="the code to measure (a checkout)")
    parser.add_argument("--config", type=Path, default=REPO / "fixtures/configs/blip2-itm-vit-g-coco")
    parser.add_argument("--device", default="cuda:0", help="cuda:0; cpu to try the script (with the tiny config)")
    parser.add_argument("--images", type=int, default=1000, help="test images (5 captions each)")
    parser.add_argument("--k-test", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="the task's image/text batch size")
    parser.add_argument("--pair-batch", type=int, help="ITM pairs per batch (default: the tree's choice)")
    parser.add_argument("--world", type=Path, default=Path("/tmp/vqb-retrieval-world"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=int, default=0, metavar="IMAGES",
                        help="after the timed run, profile one more evaluation of this many images and "
                             "print the ops that took the most device time")
    args = parser.parse_args()

    # This checkout generates the world, then the measured tree is imported by its own names.
    sys.path.insert(0, str(REPO))
    from fixtures.world.generate import ensure_world
    world = ensure_world(args.world.with_name(f"{args.world.name}-{args.images}"), layout={"flickr30k": {"test": args.images}})
    for name in [m for m in sys.modules if m.split(".")[0] in ("fixtures", "quantizers", "tasks", "reports")]:
        del sys.modules[name]
    sys.path[0] = str(args.tree.resolve())

    import torch
    from tasks import flickr_retrieval

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config_dir = args.config if args.config.is_absolute() else (REPO / args.config)
    adapter = build_adapter(config_dir, device, dtype)
    data = flickr_retrieval.load_official(world / "flickr30k", "test")
    options = {"k_test": args.k_test, "batch_size": args.batch_size, "progress": False}
    if args.pair_batch and "pair_batch_size" in inspect.signature(flickr_retrieval.evaluate).parameters:
        options["pair_batch_size"] = args.pair_batch

    # Warm-up on a few images (CUDA context, cuBLAS handles, kernel selection), not timed.
    flickr_retrieval.evaluate(adapter, flickr_retrieval.RetrievalSet(data.images[:4]), **{**options, "k_test": 4})
    called = time_calls(adapter, torch, device, {"itc": ("image_embeddings", "text_embeddings"),
                                                 "itm_pairs": ("itm_scores",)})
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(torch, device)
    start = time.perf_counter()
    result = flickr_retrieval.evaluate(adapter, data, **options)
    _synchronize(torch, device)
    seconds = time.perf_counter() - start

    details = getattr(result, "details", None) or {}
    if details:   # the tree's own split
        phases = {key.removeprefix("seconds_"): value for key, value in details.items() if key.startswith("seconds_")}
        pairs = details.get("itm_pairs")
    else:         # an older tree: the adapter's calls, timed
        pairs = called.pop("itm_scores_pairs")
        phases = {key: round(value, 3) for key, value in called.items()}
    row = {
        "tree": str(args.tree), "config": config_dir.name, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "dtype": str(dtype).removeprefix("torch."),
        "images": len(data.images), "texts": len(data.texts), "k_test": args.k_test, "batch_size": args.batch_size,
        "pair_batch": options.get("pair_batch_size", "auto"), "seconds": round(seconds, 2),
        "phase_seconds": phases, "itm_pairs": pairs,
        "itm_pairs_per_s": round(pairs / phases["itm_pairs"], 1) if pairs and phases.get("itm_pairs") else None,
        "peak_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "r_mean": round(result.metrics["r_mean"], 2),   # random weights: a sanity value, never accuracy
    }
    print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(row, indent=2) + "\n")
    if args.profile:
        profile(torch, flickr_retrieval, adapter, data, options, args.profile, device)


def profile(torch, flickr_retrieval, adapter, data, options: dict, images: int, device) -> None:
    """Where an evaluation's time goes: the wall, the device's busy time (the sum of its kernels)
    and the ops with the most device time, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    subset = flickr_retrieval.RetrievalSet(data.images[:images])
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        flickr_retrieval.evaluate(adapter, subset, **options)
        _synchronize(torch, device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    busy = sum(e.self_device_time_total for e in events) / 1e6 if device.type == "cuda" else float("nan")
    print(f"profile of {images} images: wall {wall:.2f} s (profiled), device busy {busy:.2f} s", flush=True)
    print(events.table(sort_by=sort, row_limit=25, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    main()
