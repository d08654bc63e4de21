"""What writing a quantized-model cache entry costs the run, written in place and written behind
(quantizers/cache.py, write_behind). A script, not a test.

    python benchmarks/perf/cache_write.py                     # 4 Llama-7B decoder layers, cpu
    python benchmarks/perf/cache_write.py --layers 32 --device cuda   # the whole 7B language model

The entry is what GPTQ/AWQ of --layers Llama-7B decoder layers makes at W4 g128 (4-bit codes,
float32 scales and zeros, the column-to-group map), its tensors on --device as a quantizer
leaves them. First its copy to the host as quantize() makes it (QuantizedTensor.to_host: codes
packed where they are, then copied into pinned memory; a config's entry_copy phase), into fresh
pinned memory while the last entry is still held (as the run holds the applied config's entry)
and into memory the caching host allocator kept, beside the pageable .cpu() of the same packed
tensors. Then, for the host entry, each write mode: "run waits" is the time get_or_build takes to
hand the entry back (what a config's cache_write phase costs the run), "until on disk" the time
until close() returns (every byte written and fsynced). Best of --repeat, each in a fresh
directory.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from quantizers.cache import QuantCache, QuantEntry, cache_key  # noqa: E402
from quantizers.primitives import QuantizedTensor, pack4, plain_group_index  # noqa: E402

LLAMA_7B_LAYER = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                  "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def w4_entry(layers: int, device: torch.device, group_size: int = 128) -> QuantEntry:
    generator = torch.Generator(device=device).manual_seed(0)
    entry = QuantEntry(meta={"method": "synthetic W4 g128"})
    for layer in range(layers):
        for name, (rows, cols) in LLAMA_7B_LAYER.items():
            groups = cols // group_size
            entry.weights[f"model.layers.{layer}.{name}.weight"] = QuantizedTensor(
                torch.randint(0, 16, (rows, cols), dtype=torch.uint8, device=device, generator=generator),
                torch.rand(rows, groups, device=device, generator=generator),
                torch.randint(0, 16, (rows, groups), device=device, generator=generator).float(),
                plain_group_index(cols, group_size).to(device))
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the entries go")
    parser.add_argument("--main-thread", action="store_true",
                        help="also time small torch ops on the main thread while an entry is written behind "
                             "(what a config evaluating meanwhile loses: the GIL, the cores)")
    args = parser.parse_args()
    entry = host_copies(w4_entry(args.layers, torch.device(args.device)), args.repeat)
    if args.main_thread:
        main_thread_beside_a_write(entry, args)
    for write_behind in (False, True):
        waits, totals = [], []
        for attempt in range(args.repeat):
            root = Path(tempfile.mkdtemp(dir=args.dir, prefix="cache-write-"))
            try:
                cache = QuantCache(root, write_behind=write_behind)
                started = time.perf_counter()
                cache.get_or_build(cache_key("cache_write.py", attempt), lambda: entry)
                waits.append(time.perf_counter() - started)
                cache.close()
                totals.append(time.perf_counter() - started)
                size = sum(file.stat().st_size for file in root.rglob("*.safetensors"))
            finally:
                shutil.rmtree(root, ignore_errors=True)
        print(json.dumps({"write_behind": write_behind, "layers": args.layers, "device": args.device,
                          "entry_gb": round(size / 1e9, 3), "run_waits_s": round(min(waits), 2),
                          "until_on_disk_s": round(min(totals), 2)}), flush=True)


def host_copies(entry: QuantEntry, repeat: int) -> QuantEntry:
    """Time the entry's copies to the host (see the module's docstring); returns the host entry."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def to_host() -> tuple[QuantEntry, float]:
        sync()
        started = time.perf_counter()
        host = QuantEntry({name: w.to_host() for name, w in entry.weights.items()}, meta=entry.meta)
        sync()
        return host, time.perf_counter() - started

    held, fresh = None, []
    for _ in range(repeat):   # the previous copy still alive: new pinned memory each time
        held, seconds = to_host()
        fresh.append(seconds)
    reused = []
    for _ in range(repeat):   # the previous copy freed first: its blocks come back
        held = None
        held, seconds = to_host()
        reused.append(seconds)
    sync()
    started = time.perf_counter()
    pageable = [t.cpu() for w in entry.weights.values() for t in (pack4(w.codes), w.scale, w.zero, w.group_index)]
    pageable_s = time.perf_counter() - started
    size = sum(t.numel() * t.element_size() for t in pageable)
    print(json.dumps({"host_copy_gb": round(size / 1e9, 3), "pinned_fresh_s": [round(x, 2) for x in fresh],
                      "pinned_reused_s": [round(x, 2) for x in reused], "pageable_cpu_s": round(pageable_s, 2)}),
          flush=True)
    return held


def small_ops(seconds: float) -> tuple[float, float]:
    """(ops per second, longest gap between two ops in seconds) of a loop of tiny torch ops for
    `seconds`: a stand-in for the Python that launches an evaluation's kernels."""
    a, b, out = torch.ones(64), torch.ones(64), torch.empty(64)
    count, longest, started = 0, 0.0, time.perf_counter()
    last = started
    while last - started < seconds:
        torch.add(a, b, out=out)
        now = time.perf_counter()
        longest, last, count = max(longest, now - last), now, count + 1
    return count / (last - started), longest


def main_thread_beside_a_write(entry: QuantEntry, args) -> None:
    alone, alone_gap = small_ops(1.0)
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="cache-write-"))
    try:
        cache = QuantCache(root, write_behind=True)
        started = time.perf_counter()
        cache.get_or_build(cache_key("cache_write.py", "main-thread"), lambda: entry)
        rates, gaps = [], []
        while cache._pending and not all(job.done() for job in cache._pending.values()):
            rate, gap = small_ops(0.2)
            rates.append(rate)
            gaps.append(gap)
        cache.close()
        print(json.dumps({"main_thread_ops_per_s_alone": round(alone), "longest_gap_alone_ms": round(alone_gap * 1e3, 2),
                          "ops_per_s_beside_write": round(sum(rates) / max(len(rates), 1)),
                          "longest_gap_beside_write_ms": round(max(gaps, default=0.0) * 1e3, 2),
                          "write_s": round(time.perf_counter() - started, 2)}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
