"""Time the GPTQ and AWQ tensor cores against the frozen pre-rewrite ones (tests/reference_quant.py,
commit 40de34e) on random layers, and check that they agree. A script, not a test.

    python benchmarks/perf/quant_cores.py                      # Llama-7B sizes, cuda if present
    python benchmarks/perf/quant_cores.py --device cpu --shapes 1024x1024,2752x1024 \\
        --tokens 2048 --awq-rows 1024                          # small, for a CPU

Each shape is a weight (out x in). GPTQ: a random SPD Hessian from correlated random activations
(--tokens rows), 4 bits, group 128; "stacked" quantizes --stack weights of that shape sharing
the Hessian (q/k/v, gate/up) in one gptq_quantize_stacked call against --stack old calls.
AWQ: search_scale over --stack Linears sharing --awq-rows input rows, and search_clip on one
of them (512 sampled tokens). Times are the best of --repeat runs, after one warm-up on a small
layer. "max abs diff" compares dequantized weights (GPTQ), chosen scales (AWQ scale) or clip
bounds (AWQ clip); "same bits" says whether every output is bit for bit equal. On CUDA an
"eager vs graphs" row times this tree's GPTQ with its per-block CUDA graphs off (VQB_GPTQ_GRAPHS=0,
in the "old" column) and on, and compares dequantized weights and codes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from quantizers import awq, gptq  # noqa: E402


def load_reference():
    """The frozen cores: test data of the suite's own tests (tests/reference_quant.py)."""
    from tests import reference_quant
    return reference_quant


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in part.lower().split("x")) for part in text.split(",") if part]


def timed(fn, device: torch.device, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def random_hessian(cols: int, tokens: int, device: torch.device, generator: torch.Generator):
    x = torch.randn(tokens, cols, generator=generator).to(device)
    mix = torch.randn(cols, cols, generator=generator).to(device) / cols ** 0.5
    x = x @ mix
    x[:, :8] *= 10   # a few outlier channels, as in LLM activations
    acc = gptq.HessianAccumulator(cols, device)
    acc.add_batch(x)
    return acc.hessian


def random_weight(rows: int, cols: int, device: torch.device, generator: torch.Generator):
    return (torch.randn(rows, cols, generator=generator) * 0.02).to(device)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, bool]:
    diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    return diff, all(torch.equal(x, y) for x, y in zip(a, b))


@contextlib.contextmanager
def eager_sweeps():
    previous = os.environ.get("VQB_GPTQ_GRAPHS")
    os.environ["VQB_GPTQ_GRAPHS"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["VQB_GPTQ_GRAPHS"]
        else:
            os.environ["VQB_GPTQ_GRAPHS"] = previous


def gptq_rows(ref, shape, args, device, generator):
    rows, cols = shape
    h = random_hessian(cols, args.tokens, device, generator)
    weights = [random_weight(rows, cols, device, generator) for _ in range(args.stack)]
    options = dict(bits=args.bits, group_size=args.group_size)
    w = weights[0]
    t_old, old = timed(lambda: ref.gptq_quantize_full(w, h, **options), device, args.repeat)
    t_new, new = timed(lambda: gptq.gptq_quantize_full(w, h, **options), device, args.repeat)
    yield (f"gptq {rows}x{cols}", t_old, t_new, *max_diff([old.dequantized], [new.dequantized]))
    if gptq.use_block_graphs(device, True, args.group_size, 128):
        # The same code with its per-block CUDA graphs off ("old" is then the eager sweep).
        with eager_sweeps():
            t_eager, eager = timed(lambda: gptq.gptq_quantize_full(w, h, **options), device, args.repeat)
        yield (f"gptq {rows}x{cols} eager vs graphs", t_eager, t_new,
               *max_diff([eager.dequantized, eager.codes], [new.dequantized, new.codes]))
    if args.stack > 1:
        t_old, old = timed(lambda: [ref.gptq_quantize_full(w, h, **options) for w in weights],
                           device, args.repeat)
        t_new, new = timed(lambda: gptq.gptq_quantize_stacked(weights, h, **options), device,
                           args.repeat)
        yield (f"gptq {args.stack}x {rows}x{cols} stacked", t_old, t_new,
               *max_diff([r.dequantized for r in old], [r.dequantized for r in new]))


def awq_rows(ref, shape, args, device, generator):
    rows, cols = shape
    x = torch.randn(args.awq_rows, cols, generator=generator).to(device)
    x[:, :8] *= 20
    linears = []
    for _ in range(args.stack):
        linear = nn.Linear(cols, rows, bias=False, device=device)
        linear.weight.data = random_weight(rows, cols, device, generator)
        linears.append(linear)
    options = dict(bits=args.bits, group_size=args.group_size, sym=False)
    t_old, old = timed(lambda: ref.search_scale(x, linears, **options), device, args.repeat)
    t_new, new = timed(lambda: awq.search_scale(x, linears, **options), device, args.repeat)
    diff, same = max_diff([old[0]], [new[0]])
    yield (f"awq scale {args.stack}x {rows}x{cols}", t_old, t_new, diff,
           same and old[1:] == new[1:])
    weight = linears[0].weight
    t_old, old = timed(lambda: ref.search_clip(x, weight, **options), device, args.repeat)
    t_new, new = timed(lambda: awq.search_clip(x, weight, **options), device, args.repeat)
    yield (f"awq clip {rows}x{cols}", t_old, t_new, *max_diff([old], [new]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="4096x4096,11008x4096",
                        help="weights as out x in, comma separated")
    parser.add_argument("--tokens", type=int, default=8192,
                        help="activation rows behind each Hessian")
    parser.add_argument("--awq-rows", type=int, default=4096, help="input rows of the AWQ searches")
    parser.add_argument("--stack", type=int, default=3, help="weights sharing one input")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--skip", choices=["gptq", "awq"], action="append", default=[])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ref = load_reference()
    generator = torch.Generator().manual_seed(0)

    # Warm-up (BLAS/cuBLAS handles, allocator, lazy module loads) on a small layer, untimed.
    warm = argparse.Namespace(**{**vars(args), "tokens": 256, "awq_rows": 256, "repeat": 1,
                                 "stack": 2})
    for make in (gptq_rows, awq_rows):
        for _ in make(ref, (128, 256), warm, device, generator):
            pass

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {args.bits} bits, group {args.group_size}; "
          f"best of {args.repeat}")
    header = (f"| {'case':<32} | {'old s':>8} | {'new s':>8} | {'speedup':>7} "
              f"| {'max abs diff':>12} | same bits |")
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for shape in parse_shapes(args.shapes):
        makers = [m for key, m in (("gptq", gptq_rows), ("awq", awq_rows)) if key not in args.skip]
        for make in makers:
            for case, t_old, t_new, diff, same in make(ref, shape, args, device, generator):
                print(f"| {case:<32} | {t_old:>8.3f} | {t_new:>8.3f} | {t_old / t_new:>6.2f}x "
                      f"| {diff:>12.3g} | {'yes' if same else 'NO':<9} |", flush=True)


if __name__ == "__main__":
    main()
