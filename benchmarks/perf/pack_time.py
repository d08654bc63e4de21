"""Host time of packing a shared-prefix batch by image (fixtures/adapters/shared_prefix.py), on
the CPU: a VQAv2-like LLaVA-1.5 batch of --batch 601-token prompts over --images distinct
336x336 images. Prints the median of --repeat runs of pack() and of its image grouping beside
the grouping it replaced (hashing every row's bytes); the groupings must agree.

    python benchmarks/perf/pack_time.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fixtures.adapters.shared_prefix import pack, same_images  # noqa: E402


def grouped_by_bytes(pixel_values: torch.Tensor) -> tuple[list[int], list[int]]:
    """The grouping before same_images: every row's bytes hashed as a dict key."""
    index_of: dict[bytes, int] = {}
    first_rows, image_of = [], []
    for row, pixels in enumerate(pixel_values):
        key = pixels.numpy().tobytes()
        if key not in index_of:
            index_of[key] = len(first_rows)
            first_rows.append(row)
        image_of.append(index_of[key])
    return first_rows, image_of


def median_ms(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=13)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 336, 336, generator=g) for _ in range(args.images)]
    pixels = torch.stack([images[i % args.images] for i in range(args.batch)])
    prefix = torch.cat([torch.tensor([1, 5]), torch.full((576,), 9), torch.tensor([7])])
    ids = torch.stack([torch.cat([prefix, torch.randint(10, 100, (22,), generator=g)]) for _ in range(args.batch)])
    assert same_images(pixels) == grouped_by_bytes(pixels)
    print(json.dumps({"batch": args.batch, "images": args.images, "threads": torch.get_num_threads(),
                      "pack_ms": median_ms(lambda: pack(ids, torch.ones_like(ids), pixels, 9, 0), args.repeat),
                      "same_images_ms": median_ms(lambda: same_images(pixels), args.repeat),
                      "bytes_grouping_ms": median_ms(lambda: grouped_by_bytes(pixels), args.repeat)}))


if __name__ == "__main__":
    main()
