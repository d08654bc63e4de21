"""GPTQ's per-block CUDA graphs captured once per weight (the way before `block_graph`) against
once per shape (quantizers/gptq.py: a graph serves every weight of its shape), on the weights of
--layers Llama-7B decoder layers: q/k/v stacked, o, gate/up stacked, down, W4 g128 as the perf
grid quantizes them. A script, not a test.

    python benchmarks/perf/gptq_graph_reuse.py --layers 4        # on a GPU

Prints one JSON line per mode: seconds over all the layers' weights after a warm-up layer, and
whether every result (codes, dequantized weights, scales, zeros) is bit for bit the same as the
per-weight mode's and, for the first layer, as the eager sweep's (VQB_GPTQ_GRAPHS=0). The suite
captures in a process whose allocator holds the model and its activations: each capture's
emptying of the allocator's cache costs more there than here, so this is a lower bound of the gain.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from quantizers import gptq  # noqa: E402

# (rows of each weight, columns, weights sharing the input)
LLAMA_7B_GROUPS = [(4096, 4096, 3), (4096, 4096, 1), (11008, 4096, 2), (4096, 11008, 1)]


def hessian(cols: int, tokens: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    x = torch.randn(tokens, cols, generator=generator, device=device)
    return x.T @ x / tokens


def layer_inputs(layer: int, device: torch.device, tokens: int) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    generator = torch.Generator(device=device).manual_seed(layer)
    return [([torch.randn(rows, cols, generator=generator, device=device) for _ in range(count)],
             hessian(cols, tokens, generator, device)) for rows, cols, count in LLAMA_7B_GROUPS]


def quantize_layer(inputs, per_weight: bool) -> list:
    results = []
    for weights, h in inputs:
        if per_weight:
            gptq._GRAPHS.clear()   # the old way: a capture for every weight
        results += gptq.gptq_quantize_stacked(weights, h, bits=4, group_size=128)
    return results


def same(a: list, b: list) -> bool:
    return all(torch.equal(x.dequantized, y.dequantized) and torch.equal(x.codes, y.codes)
               and torch.equal(x.scale, y.scale) and torch.equal(x.zero, y.zero) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the random activations behind each Hessian")
    args = parser.parse_args()
    device = torch.device("cuda")
    layers = [layer_inputs(layer, device, args.tokens) for layer in range(args.layers + 1)]
    os.environ["VQB_GPTQ_GRAPHS"] = "0"
    eager = quantize_layer(layers[1], per_weight=False)
    del os.environ["VQB_GPTQ_GRAPHS"]
    results = {}
    for mode in ("per_weight", "per_shape", "per_weight_again", "per_shape_again"):
        per_weight = mode.startswith("per_weight")
        gptq._GRAPHS.clear()
        quantize_layer(layers[0], per_weight)   # warm-up: kernels loaded, and per_shape's graphs captured
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = [quantize_layer(inputs, per_weight) for inputs in layers[1:]]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        results.setdefault(mode.removesuffix("_again"), out)
        print(json.dumps({"mode": mode, "layers": args.layers, "seconds": round(seconds, 3),
                          "graphs_held": len(gptq._GRAPHS),
                          "same_as_per_weight": all(same(a, b) for a, b in zip(out, results["per_weight"])),
                          "first_layer_same_as_eager": same(out[0], eager),
                          "gpu": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
