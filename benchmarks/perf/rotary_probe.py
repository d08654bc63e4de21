"""Why the compiled rotary application is slow in a full-size prefill (issue 23's last gap).

On an H100 at f13055a the fused rotary kernel took about 1.1 ms a call in the distinct batch's
prefill (64 prompts of 585 prefix tokens, 32 heads of 128): about 0.6 TB/s where its bytes
(queries and keys read and written once) would take about 0.4 ms at the card's bandwidth, 70 ms
of a batch that is 2% short of 60 samples/s (benchmarks/perf/RESULTS.md). This probe times
transformers' Llama `apply_rotary_pos_emb` on exactly those inputs (a projection's output viewed
per head and transposed, cos and sin shared by all rows) in the forms one might run it:

  eager          the modeling code as it is (about eight kernels)
  suite          what fused_elementwise.py runs since a00f619: torch.compile(dynamic=True) with the
                 head count and width fixed (with_static_head_sizes), rows and positions dynamic
  all_dynamic    torch.compile(dynamic=True) alone: every size symbolic (the suite to a00f619)
  static         torch.compile(dynamic=False): one graph per shape (the bound to aim at)

and prints, per form, milliseconds a call, the bandwidth that means, whether the outputs equal
the eager ones, and the output strides. `--code DIR` writes the generated code of the compiled
forms there (the index arithmetic's width shows as `tl.int64` in Triton).

    python benchmarks/perf/rotary_probe.py --code rotary-code
    python benchmarks/perf/rotary_probe.py --device cpu --rows 2 --length 9   # the script itself
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=585, help="tokens a row (LLaVA-1.5's prefix: 585)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--code", type=Path, default=None, help="write the compiled forms' generated code here")
    args = parser.parse_args()

    import torch
    from torch._inductor.utils import run_and_get_code
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from fixtures.adapters.fused_elementwise import with_static_head_sizes

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)

    def projected():   # as attention makes them: (rows, length, heads, dim) viewed (rows, heads, length, dim)
        x = torch.randn(args.rows, args.length, args.heads, args.head_dim, generator=generator)
        return x.to(device, dtype).transpose(1, 2)

    q, k = projected(), projected()
    angle = torch.rand(1, args.length, args.head_dim, generator=generator).to(device)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    moved = 4 * q.numel() * q.element_size() + 2 * cos.numel() * cos.element_size()   # q, k in and out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(function, *inputs) -> float:
        function(*inputs)   # the compile, once
        sync()
        start = time.perf_counter()
        for _ in range(args.repeat):
            function(*inputs)
        sync()
        return (time.perf_counter() - start) / args.repeat

    expected = apply_rotary_pos_emb(q, k, cos, sin)
    print(json.dumps({"work": "setup", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "q": list(q.shape), "q_strides": list(q.stride()),
                      "bytes_per_call": moved}), flush=True)
    with torch.inference_mode():
        for name in ("eager", "suite", "all_dynamic", "static"):
            inputs = (q, k, cos, sin)
            function, int64_index = apply_rotary_pos_emb, None
            if name != "eager":
                torch._dynamo.reset()   # a compiled form must not reuse another form's graph
                function = torch.compile(with_static_head_sizes(apply_rotary_pos_emb) if name == "suite"
                                         else apply_rotary_pos_emb, dynamic=name != "static")
                if args.code is not None:
                    _, code = run_and_get_code(function, *inputs)
                    args.code.mkdir(parents=True, exist_ok=True)
                    (args.code / f"rotary-{name}.py").write_text("\n\n".join(code))
                    int64_index = any("tl.int64" in c for c in code)
            seconds = timed(function, *inputs)
            outputs = function(*inputs)
            print(json.dumps({"work": name, "ms_per_call": round(seconds * 1e3, 3),
                              "gb_per_s": round(moved / seconds / 1e9, 1),
                              "same_as_eager": all(torch.equal(a, b) for a, b in zip(outputs, expected)),
                              "out_strides": list(outputs[0].stride()), "int64_index": int64_index}), flush=True)


if __name__ == "__main__":
    main()
