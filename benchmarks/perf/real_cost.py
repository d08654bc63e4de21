"""Real memory and decode speed of packed exports (issue 24): what a W4 config of the language
model costs once it runs on a low-bit kernel, beside bf16, on one GPU.

For each config (FP, RTN / GPTQ / AWQ W4 g128 of the language model) the script builds the
LLaVA-1.5-7B architecture from its shipped config with seeded random bf16 weights (speed and
memory only, never accuracy: fixtures/adapters/random_init.py), quantizes through the suite's
API (quantizers.api.quantize; GPTQ and AWQ calibrate on 128 embedded-world VQAv2 train pairs),
exports with fixtures/runtime/export.py (a compressed-tensors pack-quantized checkpoint), frees
everything, and loads the checkpoint back: every tensor but the packed Linears through
transformers, and each packed Linear as an Int4Linear on torch's tinygemm int4 kernel
(aten._weight_int4pack_mm: the CUDA kernel torchao's int4 weight-only config runs, in core
torch, so nothing extra is carried; _for_cpu twins on CPU). Then, per config:

  real_mem_mb        torch.cuda.memory_allocated with only the loaded model on the GPU (on
                     CPU: the bytes of its tensors)
  tokens_per_s_bB    greedy decode throughput at batch B: B x (N - 1) new tokens over the
                     time of generating N tokens less the time of generating 1 (the prefill),
                     after a warm-up; random prompt ids of --prompt-tokens, text only
  peak_mem_mb_bB     the peak during that decode (KV cache included)

Prints a markdown table and writes every row as JSON (--out).

    python benchmarks/perf/real_cost.py --out real-cost.json                     # H100, LLaVA-1.5-7B
    python benchmarks/perf/real_cost.py --config fixtures/tiny/llava-tiny --device cpu \\
        --batches 1,4 --new-tokens 8 --out /tmp/real-cost.json                   # tries it on a CPU

On a machine without a package index, carry the compressed-tensors wheel and its one missing
dependency (benchmarks/perf/gpu_grid.sh installs .whl/ to /tmp/site the same way):
compressed_tensors-0.20.1-py3-none-any.whl and loguru-0.7.3-py3-none-any.whl (pydantic, which it
also needs, comes with transformers' dependencies; check with `pip show pydantic`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fixtures.runtime.real_cost import KERNEL, decode_speed, load_packed, loaded_mb, settle, tensor_mb  # noqa: E402

METHODS = {"fp": None, "rtn": "rtn", "gptq": "gptq", "awq": "awq"}


def calibration_batches(adapter, world: Path, samples: int) -> list[dict]:
    """The suite's calibration pairs (VQAv2 train questions with their answers), 16 a batch."""
    from tasks import vqav2
    chosen = vqav2.load_official(world / "vqav2", "train")[:samples]
    texts = [adapter.calibration_text(s.question, s.multiple_choice_answer) for s in chosen]
    return [adapter.model_inputs([s.image() for s in chosen[i:i + 16]], texts[i:i + 16])
            for i in range(0, len(chosen), 16)]


def build_adapter(config_dir: Path, device: torch.device, dtype: torch.dtype):
    """A LLaVA adapter over config_dir: its weights where the folder has them (a tiny checkpoint,
    to try the script), else the architecture with seeded random weights (the full-size runs)."""
    from fixtures.adapters import random_init
    from fixtures.adapters.llava import LlavaAdapter

    if any(Path(config_dir).glob("*.safetensors")):
        return LlavaAdapter.load("real-cost", str(config_dir), device, str(dtype).removeprefix("torch."))
    model, processor = random_init.llava_model_and_processor(config_dir, device, dtype)
    return LlavaAdapter("real-cost", model, processor, device)


def export_config(method: str, args, device, dtype, checkpoint: Path, world: Path) -> dict:
    """Quantize the language model of a fresh random-init model with `method`, W4 g128, and
    export it; the model is freed before the checkpoint is loaded back."""
    from fixtures.runtime.export import write_checkpoint
    from fixtures.runtime.models import FPSnapshot
    from quantizers.api import quantize
    from quantizers.config import make_config

    adapter = build_adapter(args.config, device, dtype)
    model = adapter.model
    config = make_config(f"{method}-w4g{args.group_size}-language", method, {"language": 4},
                         group_size=args.group_size)
    batches = calibration_batches(adapter, world, args.calibration_samples) if config.calibrates else None
    snapshot = FPSnapshot(model, [adapter.components["language"]])
    started = time.perf_counter()
    report, entry = quantize(adapter, config, batches)
    seconds = time.perf_counter() - started
    snapshot.restore(model)   # FP again, hooks gone: write_checkpoint applies the entry itself
    write_checkpoint(adapter, config, entry, checkpoint, {"architecture": str(args.config)})
    del model, adapter, snapshot, entry, batches
    settle(device)
    return {"config": config.name, "quant_seconds": round(seconds, 1), "bpw_language": round(report.bpw["language"], 3)}


def measure(model, row: dict, args, device) -> dict:
    row["real_mem_mb"] = round(loaded_mb(model, device), 1)
    row["tensor_mb"] = round(tensor_mb(model), 1)
    for batch in [int(b) for b in args.batches.split(",")]:
        row.update(decode_speed(model, batch, args.prompt_tokens, args.new_tokens, device))
    return row


def markdown(rows: list[dict], batches: list[int]) -> str:
    head = ["config", "kernel", "real_mem_mb"] + [f"tokens/s b{b}" for b in batches] + ["quant s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], r["kernel"], r["real_mem_mb"], *[r[f"tokens_per_s_b{b}"] for b in batches],
                 r.get("quant_seconds", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "fixtures/configs/llava-1.5-7b-hf")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--methods", default="fp,rtn,gptq,awq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--world", type=Path, default=Path("/tmp/vqb-real-cost-world"))
    parser.add_argument("--checkpoints", type=Path, default=Path("/tmp/vqb-real-cost"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from fixtures.world.generate import ensure_world

    device = torch.device(args.device)
    dtype = torch.bfloat16   # tinygemm's dtype; also the released models'
    world = ensure_world(args.world, layout={"vqav2": {"train": 200, "val": 8}})
    rows = []
    for method in args.methods.split(","):
        if METHODS.get(method, "") == "":
            sys.exit(f"--methods: unknown {method!r}; known: {', '.join(METHODS)}")
        if METHODS[method] is None:
            model = build_adapter(args.config, device, dtype).model
            row = {"config": "fp16", "kernel": "bf16 nn.Linear (cuBLAS)" if device.type == "cuda" else "bf16 nn.Linear"}
        else:
            row = export_config(METHODS[method], args, device, dtype, args.checkpoints / method, world)
            model = load_packed(args.checkpoints / method, device, dtype)
            row.update(kernel=KERNEL, kernel_rel_err=round(model.kernel_error, 5))
        weights = "trained" if any(args.config.glob("*.safetensors")) else "random-init"
        row.update(architecture=str(args.config), weights=weights, device=str(device),
                   device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__)
        rows.append(measure(model, row, args, device))
        print(json.dumps(rows[-1]), flush=True)
        del model
        settle(device)
    print(markdown(rows, [int(b) for b in args.batches.split(",")]))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
