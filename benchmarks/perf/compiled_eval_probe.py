"""Where the LLaVA-1.5-7B VQAv2-style batch spends its time, and what compiling buys (issue 23).

A probe, not the suite: the random-init LLaVA-1.5-7B architecture (timings only), batches of
--batch embedded-world VQAv2 prompts, each variant warmed up on the first batch (the suite's
variants twice) and timed on the next ones. Variants:
  eager          model.generate as the suite runs it today (dynamic cache, SDPA)
  static         generate with a static cache: transformers compiles the decode step
                 (mode reduce-overhead: CUDA graphs)
  suite_eager    the suite's adapter.generate_encoded, default settings
  suite_static   the same with Generation(static_cache=True) (fixtures/adapters/static_decode.py)
  suite_shared   the same with share_image_prefix=True: the batch packed by image, the decode
                 step run eagerly (fixtures/adapters/shared_prefix.py)
  suite_shared_graphs  the same with decode_graphs=True: the decode step captured as a CUDA
                 graph once per batch shape (what the graphs save, against suite_shared)
  suite_shared_static  share_image_prefix and static_cache (static_cache does not change the
                 packed path)
  suite_shared_fused   suite_shared with Generation(fused_elementwise=True): the language model's
                 norms, MLPs and rotary application compiled (fixtures/adapters/fused_elementwise.py;
                 a GPU only), after the suite's `compile` phase, reported apart: the shared path's
                 device time was 0.42 s a batch at 7c729b1, about 0.15-0.19 s of it eager
                 elementwise kernels that these fuse
  suite_shared_fused_graphs  suite_shared_fused with decode_graphs=True (where the host, not the
                 device, bounds the fused shared path: the H200 of RESULTS.md)
  suite_distinct       suite_shared on batches of distinct images, one question each (a world of
                 (--batches + 1) * --batch images, each image's first question): unshared
                 VQAv2-style evaluation through the perf grid's path, nothing to share (issue 23's
                 unshared 60 samples/s: the prefill of 64 whole prompts, then the packed decode)
  suite_distinct_fused suite_distinct with suite_shared_fused's compiled elementwise code
  suite_distinct_fused_graphs  the same with decode_graphs=True (the suite's default on a GPU)
  task_shared, task_distinct   the suite's whole loop (vqav2.evaluate: tasks.base.generate_replies)
                 with the default GPU path's settings on the samples of suite_shared_fused_graphs and
                 suite_distinct_fused_graphs: each batch encoded and staged on the background thread
                 while the device generates the last, where every suite_* variant encodes up front.
                 Beside them, one batch's encoding on the host alone: whether the host's image
                 processing, not the device, bounds a real run
  suite_eager_small    the suite's eager path on the same samples in batches of --small-batch
                 (default 1: issue 23's batch-vs-batch-1 agreement; the H100 runs to 848f78b used 8): how
                 many predictions a mere change of batch flips (bf16, and random weights' near-tied
                 logits), the floor for the other variants' "same as eager"
  prefill_*      one prefill (use_cache=False, logits of the last token): eager SDPA, the same
                 batch without padding (what the mask costs), torch.compile of the model at a
                 fixed padded length, and FlexAttention
Prints one JSON line per measurement: seconds, samples/s, predictions equal to eager's.

    python benchmarks/perf/compiled_eval_probe.py --variants eager,static,prefill
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def timed(torch, fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="eager,static,prefill")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="timed batches after the warm-up one")
    parser.add_argument("--distinct-batches", type=int, default=None,
                        help="the suite_distinct variants' timed batches (default: --batches)")
    parser.add_argument("--new-tokens", type=int, default=10)
    parser.add_argument("--small-batch", type=int, default=1, help="suite_eager_small's batch size")
    parser.add_argument("--config", default="fixtures/configs/llava-1.5-7b-hf")
    parser.add_argument("--device", default="cuda", help="cpu: try the probe on --config fixtures/tiny/llava-tiny")
    parser.add_argument("--world", type=Path, default=Path("/tmp/vqb-perf-world"))
    parser.add_argument("--profile", default="", help="suite_* variants to profile over one more batch (comma list)")
    parser.add_argument("--profile-dir", type=Path, default=Path("."), help="where the profiles' tables go")
    args = parser.parse_args()

    import torch
    from benchmarks.perf.full_size import random_init_module
    from fixtures.adapters.llava import LlavaAdapter
    from fixtures.world.generate import ensure_world
    from tasks import vqav2

    world = ensure_world(args.world, layout={"vqav2": {"train": 20, "val": 120}})
    samples = vqav2.load_official(world / "vqav2", "val")
    device = torch.device(args.device)
    if (REPO / args.config / "model.safetensors").is_file():   # a trained checkpoint (the tiny one)
        adapter = LlavaAdapter.load("probe", str(REPO / args.config), device, "auto")
        model, processor = adapter.model, adapter.processor
    else:
        model, processor = random_init_module().llava_model_and_processor(
            REPO / args.config, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        adapter = LlavaAdapter("probe", model, processor, device)
    pad = processor.tokenizer.pad_token_id
    batches, encoded = [], []
    for start in range(0, (args.batches + 1) * args.batch, args.batch):
        chosen = samples[start:start + args.batch]
        prompts = [adapter.short_answer_prompt(s.question) for s in chosen]
        encoded.append(adapter.staged(adapter.encode([s.image() for s in chosen], prompts)))   # as the suite's tasks do
        batches.append(adapter.to_device(encoded[-1]))
    lengths = [b["input_ids"].shape[1] for b in batches]
    distinct, distinct_samples = [], []   # batches of distinct images, one question each (suite_distinct, task_distinct)
    if any(v.startswith(("suite_distinct", "task_distinct")) for v in args.variants.split(",")):
        images = ((args.distinct_batches or args.batches) + 1) * args.batch
        world_d = ensure_world(args.world.with_name(args.world.name + "-distinct"),
                               layout={"vqav2": {"train": 20, "val": images}})
        first_question = {}
        for sample in vqav2.load_official(world_d / "vqav2", "val"):
            first_question.setdefault(sample.image_id, sample)
        chosen_d = list(first_question.values())
        distinct_samples = chosen_d[:images]
        for start in range(0, images, args.batch):
            chosen = chosen_d[start:start + args.batch]
            distinct.append(adapter.staged(adapter.encode([s.image() for s in chosen],
                                                          [adapter.short_answer_prompt(s.question) for s in chosen])))

    def report(**row):
        print(json.dumps(row), flush=True)

    report(work="setup", gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
           transformers=__import__("transformers").__version__, prompt_lengths=lengths)
    variants = args.variants.split(",")
    answers: dict[str, list] = {}

    def generate_all(name, **extra):
        _, warm = timed(torch, lambda: model.generate(**batches[0], max_new_tokens=args.new_tokens,
                                                      do_sample=False, pad_token_id=pad, **extra))
        outputs, seconds = [], 0.0
        for inputs in batches[1:]:
            out, spent = timed(torch, lambda: model.generate(**inputs, max_new_tokens=args.new_tokens,
                                                             do_sample=False, pad_token_id=pad, **extra))
            seconds += spent
            outputs += out[:, inputs["input_ids"].shape[1]:].tolist()
        answers[name] = outputs
        same = sum(a == b for a, b in zip(outputs, answers.get("eager", outputs)))
        report(work=name, warmup_s=round(warm, 2), seconds=round(seconds, 3),
               samples_per_s=round(len(outputs) / seconds, 1), same_as_eager=f"{same}/{len(outputs)}",
               peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None)

    def graphs_compiled():
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def suite_all(name, generation, batches_encoded=None):
        """The suite's own path (adapter.generate_encoded) with these decoding settings, warmed up
        on the first batch twice: with a static cache the first call fills a new cache through
        the model itself and the second compiles the prefill (at 7c729b1 that compile, about 73 s,
        landed in the first timed batch)."""
        batches_encoded = batches_encoded or encoded
        before = graphs_compiled()
        _, warm = timed(torch, lambda: [adapter.generate_encoded(batches_encoded[0], generation) for _ in range(2)])
        outputs, seconds, each = [], 0.0, []
        for batch in batches_encoded[1:]:
            out, spent = timed(torch, lambda: adapter.generate_encoded(batch, generation))
            seconds += spent
            each.append(round(spent, 2))
            outputs += out
        answers[name] = outputs
        same = {f"same_as_{other}": f"{sum(a == b for a, b in zip(outputs, answers[other]))}/{len(outputs)}"
                for other in ("suite_eager", "suite_shared", "suite_shared_fused", "suite_distinct", "suite_distinct_fused")
                if other in answers and other != name and other.startswith("suite_distinct") == (batches_encoded is distinct)}
        report(work=name, warmup_s=round(warm, 2), seconds=round(seconds, 3),
               samples_per_s=round(len(outputs) / seconds, 1), **same,
               batch_seconds=each, compiled_graphs=graphs_compiled() - before,
               peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None)
        if name in args.profile.split(","):
            profile_batch(name, lambda: adapter.generate_encoded(batches_encoded[1], generation))

    def profile_batch(name, work):
        """One batch under torch.profiler: the device's busy time beside the wall (what is left to
        the host: launches, Python, synchronizations) and the operators that take the device."""
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            _, wall = timed(torch, work)
        events = prof.key_averages()
        # The kernels' own rows only: an operator's row counts its kernels' time again.
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6 if device.type == "cuda" else None
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=30)
        path = args.profile_dir / f"profile-{name}.txt"
        path.write_text(table)
        report(work=f"profile_{name}", wall_s=round(wall, 3), device_busy_s=round(busy, 3) if busy else None,
               kernels=sum(e.count for e in kernels) if busy else None,
               table=str(path))

    with torch.inference_mode():
        from tasks.requests import Generation
        # Every variant but the *_fused ones with eager elementwise code, and but the *_graphs ones
        # with an eager decode step (the suite's defaults on a GPU: fused, captured).
        plain = Generation(max_new_tokens=args.new_tokens, fused_elementwise=False, decode_graphs=False)
        shared = replace(plain, share_image_prefix=True)
        for name, generation in (("suite_eager", plain), ("suite_static", replace(plain, static_cache=True)),
                                 ("suite_shared", shared), ("suite_shared_graphs", replace(shared, decode_graphs=True)),
                                 ("suite_shared_static", replace(shared, static_cache=True))):
            if name in variants:
                suite_all(name, generation)
        if "suite_distinct" in variants:
            suite_all("suite_distinct", shared, distinct)
        fused = replace(shared, fused_elementwise=True)
        if any("_fused" in name or name.startswith("task_") for name in variants):   # the default path's compile
            _, seconds = timed(torch, adapter.compile_for_evaluation)   # the suite's `compile` phase
            report(work="compile", seconds=round(seconds, 1), compiled_graphs=graphs_compiled())
        captured = replace(fused, decode_graphs=True)
        for name, generation, batches_encoded in (("suite_shared_fused", fused, None),
                                                  ("suite_shared_fused_graphs", captured, None),
                                                  ("suite_distinct_fused", fused, distinct),
                                                  ("suite_distinct_fused_graphs", captured, distinct)):
            if name in variants:
                suite_all(name, generation, batches_encoded)
        for name, task_samples, compared in (("task_shared", samples, "suite_shared_fused_graphs"),
                                             ("task_distinct", distinct_samples, "suite_distinct_fused_graphs")):
            if name not in variants:
                continue
            timed_count = (args.distinct_batches or args.batches) if name == "task_distinct" else args.batches
            warm, measured = task_samples[:args.batch], task_samples[args.batch:(timed_count + 1) * args.batch]
            chosen = measured[:args.batch]
            pictures, prompts = [s.image() for s in chosen], [adapter.short_answer_prompt(s.question) for s in chosen]
            _, host = timed(torch, lambda: adapter.staged(adapter.encode(pictures, prompts)))
            vqav2.evaluate(adapter, warm, batch_size=args.batch, progress=False, generation=captured)
            result, seconds = timed(torch, lambda: vqav2.evaluate(adapter, measured, batch_size=args.batch,
                                                                  progress=False, generation=captured))
            outputs = [s["prediction"] for s in result.samples]
            same = ({f"same_as_{compared}": f"{sum(a == b for a, b in zip(outputs, answers[compared]))}/{len(outputs)}"}
                    if compared in answers else {})
            report(work=name, seconds=round(seconds, 3), samples_per_s=round(len(outputs) / seconds, 1), **same,
                   host_encode_s_per_batch=round(host, 3))
        if "suite_eager_small" in variants:
            small, outputs = args.small_batch, []
            timed_samples = samples[args.batch:(args.batches + 1) * args.batch]
            for start in range(0, len(timed_samples), small):
                chosen = timed_samples[start:start + small]
                outputs += adapter.generate_encoded(adapter.encode(
                    [s.image() for s in chosen], [adapter.short_answer_prompt(s.question) for s in chosen]), plain)
            same = sum(a == b for a, b in zip(outputs, answers.get("suite_eager", outputs)))
            report(work="suite_eager_small", batch=small, same_as_suite_eager=f"{same}/{len(outputs)}")
        if "eager" in variants:
            generate_all("eager")
        if "static" in variants:
            generate_all("static", cache_implementation="static")
        if "prefill" in variants:
            inputs = batches[1]

            def prefill(m, **kw):
                return m(**kw, use_cache=False, logits_to_keep=1).logits
            _, seconds = timed(torch, lambda: prefill(model, **inputs))
            _, seconds = timed(torch, lambda: prefill(model, **inputs))
            report(work="prefill_eager_sdpa", seconds=round(seconds, 3), tokens=inputs["input_ids"].numel())
            # The batch's longest prompt (no padding) repeated: same shapes, no mask.
            full = int(inputs["attention_mask"].sum(1).argmax())
            rows = inputs["input_ids"].shape[0]
            unpadded = {"input_ids": inputs["input_ids"][full:full + 1].expand(rows, -1).contiguous(),
                        "pixel_values": inputs["pixel_values"]}
            prefill(model, **unpadded)
            _, seconds = timed(torch, lambda: prefill(model, **unpadded))
            report(work="prefill_eager_no_mask", seconds=round(seconds, 3), tokens=unpadded["input_ids"].numel())
            config = model.config
            vision = lambda: model.model.get_image_features(  # noqa: E731
                pixel_values=inputs["pixel_values"], vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy)
            vision()
            _, seconds = timed(torch, vision)
            report(work="vision_tower", seconds=round(seconds, 3))
            try:
                compiled = torch.compile(model, dynamic=False)
                _, first = timed(torch, lambda: prefill(compiled, **inputs))
                _, seconds = timed(torch, lambda: prefill(compiled, **inputs))
                _, again = timed(torch, lambda: prefill(compiled, **inputs))
                report(work="prefill_compiled", compile_s=round(first, 1), seconds=round(min(seconds, again), 3))
            except Exception as err:   # a probe: say what failed and go on
                report(work="prefill_compiled", error=f"{type(err).__name__}: {str(err)[:300]}")
            try:
                model.set_attn_implementation("flex_attention")
                prefill(model, **inputs)
                _, seconds = timed(torch, lambda: prefill(model, **inputs))
                report(work="prefill_flex", seconds=round(seconds, 3))
                model.set_attn_implementation("sdpa")
            except Exception as err:
                report(work="prefill_flex", error=f"{type(err).__name__}: {str(err)[:300]}")


if __name__ == "__main__":
    main()
