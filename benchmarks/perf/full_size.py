"""Full-size speed and memory, measured through a tree's own public API (not a timed test).

Builds a released architecture from its shipped config (fixtures/configs/, seeded random bf16
weights: timings only, never accuracy) and times, through the code of the tree given with
--tree (this checkout, or 40de34e exported next to it, so both run in one GPU session). The
config is LLaVA-1.5 (default) or BLIP-2 OPT (--config blip2-opt-2.7b: works eval and gptq_all).

  eval         tasks.vqav2.evaluate at each --batches size: samples/s, and whether the
               predictions equal those at batch size 1 (the first --parity samples); with
               --beams 1,5, once per beam width (greedy, beam search), each row naming it; for
               greedy LLaVA in trees with image-prefix sharing, also with it on (how many
               predictions equal the unshared ones)
  gptq_lm      quantizers.api.quantize: GPTQ W4 g128 of the language model (--layers: a slice
               "0-3" of its blocks, or all), 128 calibration samples
  awq_lm       the same with AWQ
  gptq_vision  GPTQ W4 g128 of the vision tower
  gptq_all     GPTQ W4 g128 of every quantizable component (BLIP-2: vision, qformer, connector,
               language; LLaVA: vision, connector, language): seconds, peak memory, Linears
  qvlm_all     (trees with Q-VLM) Q-VLM W4A4 of every component, static per-tensor activations:
               encoder optimization and block search seconds, peak memory
  qvlm_official_all  the same with Q-VLM's default activation quantizers (a_quant official)
  awq_qig_lm, gptq_qig_lm  AWQ / GPTQ W4 g128 of the language model with QIG token weights
  pool         (this tree only) the runtime's model pool: FP model + a quantized config (RTN W4
               g128 of the language model) + evaluation at --pool-batch, in place vs a deep copy
               per config (the old way); peak device memory of each

    python benchmarks/perf/full_size.py --tree . --work eval,gptq_lm --out new.json
    python benchmarks/perf/full_size.py --tree .old --layers 0-3 --out old.json
    python benchmarks/perf/full_size.py --tree . --config blip2-opt-2.7b --work eval,gptq_all \
        --batches 1,64 --beams 1,5 --out blip2.json

Prints one line per measurement and writes them as JSON (--out). The world is generated small
(--world), once, by this checkout's generator.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def random_init_module():
    """This checkout's random-init helpers, loaded by file so either tree can be measured (also
    retrieval_scale.py's)."""
    spec = importlib.util.spec_from_file_location("vqb_random_init", REPO / "fixtures/adapters/random_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Clock:
    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def __enter__(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        cuda = self.device.type == "cuda"
        if cuda:
            self.torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        self.peak_gb = self.torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="the code to measure (a checkout)")
    parser.add_argument("--config", default="llava-1.5-7b-hf", help="a folder of fixtures/configs/, or a path")
    parser.add_argument("--device", default="cuda:0", help="cuda:0; cpu only to try the script on a small config")
    parser.add_argument("--work", default="eval,gptq_lm,awq_lm,gptq_vision")
    parser.add_argument("--layers", default="all", help='blocks quantized: all, or a slice like "0-3"')
    parser.add_argument("--vision-layers", default="all")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--beams", help='beam widths timed by eval, e.g. "1,5" (default: the adapter\'s, greedy)')
    parser.add_argument("--samples", type=int, default=320, help="VQAv2 questions timed per batch size")
    parser.add_argument("--batch1-samples", type=int, default=32, help="questions timed at batch size 1")
    parser.add_argument("--parity", type=int, default=32, help="questions whose predictions are compared")
    parser.add_argument("--pool-config", default="llava-1.5-13b-hf")
    parser.add_argument("--pool-batch", type=int, default=32)
    parser.add_argument("--pool-copy", default="no,yes",
                        help="pool variants: no (in place, the suite's), yes (a deep copy per config)")
    parser.add_argument("--world", type=Path, default=Path("/tmp/vqb-perf-world"))
    parser.add_argument("--progress", action="store_true", help="the quantizers' progress bars (stderr)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    # This checkout generates the world, then the measured tree is imported by its own names.
    sys.path.insert(0, str(REPO))
    from fixtures.world.generate import ensure_world
    world = ensure_world(args.world, layout={"vqav2": {"train": 200, "val": 120}})
    for name in [m for m in sys.modules if m.split(".")[0] in ("fixtures", "quantizers", "tasks", "reports")]:
        del sys.modules[name]
    sys.path[0] = str(args.tree.resolve())

    import torch
    from quantizers.api import quantize
    from quantizers.config import make_config
    from tasks import vqav2

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: list[dict] = []

    def report(**row):
        row = {"tree": str(args.tree), "config": args.config, **row}
        results.append(row)
        print(json.dumps(row), flush=True)

    work = args.work.split(",")
    samples = vqav2.load_official(world / "vqav2", "val")
    calibration = vqav2.load_official(world / "vqav2", "train")[:128]
    if set(work) - {"pool"}:
        config_dir = REPO / "fixtures/configs" / args.config   # or a path
        adapter = build_adapter(config_dir, device, dtype, work)
        model = adapter.model
        report(work="model", parameters_b=sum(p.numel() for p in model.parameters()) / 1e9,
               prompt_tokens=adapter.model_inputs([samples[0].image()], [vqav2_prompt(adapter, samples[0])])["input_ids"].shape[1])

    decoding = Decoding(adapter) if set(work) - {"pool"} else None
    if "eval" in work:
        # No --beams: the default decoding (greedy), and rows without a beams column (as before).
        for beams in [int(b) for b in args.beams.split(",")] if args.beams else [None]:
            beam_column = {}
            if beams is not None:
                decoding.set(num_beams=beams)
                beam_column = {"beams": beams}
            predictions = {}
            for batch in [int(b) for b in args.batches.split(",")]:
                chosen = samples[:args.batch1_samples if batch == 1 else args.samples]
                result, clock = timed_eval(adapter, chosen, batch, decoding)
                predictions[batch] = [s["prediction"] for s in result.samples[:args.parity]]
                alone = predictions.get(1, predictions[batch])
                shared = min(len(alone), len(predictions[batch]))   # --samples may be under --batch1-samples
                report(work="eval", **beam_column, batch=batch, samples=len(chosen), seconds=round(clock.seconds, 2),
                       samples_per_s=round(len(chosen) / clock.seconds, 2), peak_gb=round(clock.peak_gb, 1),
                       same_as_batch1=predictions[batch][:shared] == alone[:shared])
                if batch > 1 and adapter.family == "llava" and decoding.generation.num_beams == 1 \
                        and hasattr(decoding.generation, "share_image_prefix"):   # trees with sharing
                    eval_shared_prefix(adapter, chosen, batch, [s["prediction"] for s in result.samples], report,
                                       decoding)

    if "eval_profile" in work:   # where one batch's time goes (this tree's adapter API)
        batch = samples[:64]
        prompts = [vqav2_prompt(adapter, s) for s in batch]
        images = [s.image() for s in batch]
        with Clock(torch, device) as encode_clock:
            encoded = adapter.encode(images, prompts)
        with Clock(torch, device) as move_clock:
            inputs = adapter.to_device(encoded)
        with torch.inference_mode(), Clock(torch, device) as prefill_clock:
            model(**inputs, use_cache=False, logits_to_keep=1)
        with Clock(torch, device) as generate_clock:
            adapter.generate_encoded(encoded, decoding.generate_argument())
        with torch.inference_mode(), Clock(torch, device) as vision_clock:
            model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                           vision_feature_layer=model.config.vision_feature_layer,
                                           vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        report(work="eval_profile", batch=64, encode_s=round(encode_clock.seconds, 3),
               to_device_s=round(move_clock.seconds, 3), prefill_s=round(prefill_clock.seconds, 3),
               vision_s=round(vision_clock.seconds, 3), generate_s=round(generate_clock.seconds, 3),
               attn=getattr(model.config, "_attn_implementation", "?"))

    if any(w in work for w in ("gptq_lm", "awq_lm", "gptq_vision", "gptq_all", "qvlm_all", "qvlm_official_all",
                               "awq_qig_lm", "gptq_qig_lm")):
        texts = [adapter.calibration_text(s.question, s.multiple_choice_answer) for s in calibration]
        batches = [adapter.model_inputs([s.image() for s in calibration[i:i + 16]], texts[i:i + 16])
                   for i in range(0, len(calibration), 16)]
        originals = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
        all_components = {component: 4 for component in adapter.quantizable}
        jobs = {"gptq_lm": ("gptq", {"language": 4}, args.layers, {}),
                "awq_lm": ("awq", {"language": 4}, args.layers, {}),
                "gptq_vision": ("gptq", {"vision": 4}, args.vision_layers, {}),
                "gptq_all": ("gptq", all_components, args.layers, {}),
                # Q-VLM W4A4, every component, static per-tensor activations: the paper's setting
                "qvlm_all": ("qvlm", all_components, args.layers, _qvlm_activation_settings),
                # Q-VLM W4A4 with the method's default activation quantizers (the authors' code's)
                "qvlm_official_all": ("qvlm", all_components, args.layers, {"a_bits": 4}),
                # QIG-weighted calibration (issue 19): integrated gradients per block, 32 steps
                "awq_qig_lm": ("awq", {"language": 4}, args.layers, {"params": {"weighting": "qig"}}),
                "gptq_qig_lm": ("gptq", {"language": 4}, args.layers, {"params": {"weighting": "qig"}})}
        for name in [w for w in work if w in jobs]:
            method, bits, layers, extra = jobs[name]
            extra = extra() if callable(extra) else extra
            config = make_config(name, method, bits, group_size=128, layers=layers, **extra)
            with Clock(torch, device) as clock:
                report_ = quantize(adapter, config, batches, progress=args.progress)[0]
            qvlm_details = report_.details.get("qvlm", {})
            report(work=name, layers=layers, linears=len(report_.layers), seconds=round(clock.seconds, 1),
                   peak_gb=round(clock.peak_gb, 1),
                   **{k: qvlm_details[k] for k in ("encoder_seconds", "search_seconds") if k in qvlm_details})
            with torch.no_grad():   # back to FP for the next job
                for n, p in model.named_parameters():
                    p.copy_(originals[n])
            for module in model.modules():
                module._forward_pre_hooks.clear()
                module._buffers.pop("awq_input_scale", None)
        del model, adapter, originals, batches
        torch.cuda.empty_cache()

    if "pool" in work:
        pool_memory(args, torch, device, samples, report)

    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


class Decoding:
    """VQAv2's decoding settings in the measured tree: sent with each request where its tasks take
    a Generation (tasks.requests), else set on the adapter (trees before per-request decoding)."""

    def __init__(self, adapter):
        from tasks import vqav2
        self.adapter, self.per_request = adapter, hasattr(vqav2, "GENERATION")
        self.generation = vqav2.GENERATION if self.per_request else adapter.generation

    def set(self, **settings) -> None:
        self.generation = dataclasses.replace(self.generation, **settings)
        if not self.per_request:
            self.adapter.generation = self.generation

    def evaluate_arguments(self) -> dict:
        return {"generation": self.generation} if self.per_request else {}

    def generate_argument(self):
        """generate_encoded's second argument: the settings, or (older trees) VQAv2's token limit."""
        from tasks import vqav2
        return self.generation if self.per_request else vqav2.MAX_NEW_TOKENS


def timed_eval(adapter, chosen, batch, decoding: Decoding):
    """(result, Clock) of tasks.vqav2.evaluate on `chosen` at `batch`, after a one-batch warm-up."""
    import torch
    from tasks import vqav2

    vqav2.evaluate(adapter, chosen[:batch], batch_size=batch, progress=False, **decoding.evaluate_arguments())
    with Clock(torch, adapter.device) as clock:
        result = vqav2.evaluate(adapter, chosen, batch_size=batch, progress=False, **decoding.evaluate_arguments())
    return result, clock


def eval_shared_prefix(adapter, chosen, batch, unshared, report, decoding: "Decoding") -> None:
    """The same evaluation with image-prefix sharing on: samples/s, and how many predictions
    equal the unshared ones."""
    decoding.set(share_image_prefix=True)
    try:
        result, clock = timed_eval(adapter, chosen, batch, decoding)
    finally:
        decoding.set(share_image_prefix=False)
    shared = [s["prediction"] for s in result.samples]
    report(work="eval_shared_prefix", batch=batch, samples=len(chosen), seconds=round(clock.seconds, 2),
           samples_per_s=round(len(chosen) / clock.seconds, 2), peak_gb=round(clock.peak_gb, 1),
           same_as_unshared=sum(a == b for a, b in zip(shared, unshared)), images=len({s.image_id for s in chosen}))


def build_adapter(config_dir: Path, device, dtype, work: list[str]):
    """The measured tree's adapter around this checkout's random-init model of config_dir: LLaVA
    or BLIP-2 OPT, told apart by the config's model_type."""
    config = json.loads((Path(config_dir) / "config.json").read_text())
    model_type = config["model_type"]
    if model_type == "llava":
        from fixtures.adapters.llava import LlavaAdapter
        model, processor = random_init_module().llava_model_and_processor(config_dir, device, dtype)
        return LlavaAdapter("perf", model, processor, device)
    if model_type != "blip-2":
        sys.exit(f"--config {config_dir}: model_type {model_type!r} is neither llava nor blip-2")
    if "Blip2ForImageTextRetrieval" in config.get("architectures", []):
        sys.exit(f"--config {config_dir}: a BLIP-2 retrieval model answers no VQAv2; use the generative one")
    unsupported = set(work) - {"eval", "gptq_all", "gptq_lm", "gptq_vision", "awq_lm"}
    if unsupported:
        sys.exit(f"--config {config_dir}: BLIP-2 runs eval and the GPTQ/AWQ works, not {', '.join(sorted(unsupported))}")
    from fixtures.adapters.blip2 import Blip2Adapter   # the measured tree's own
    model, processor = random_init_module().blip2_model_and_processor(config_dir, device, dtype, retrieval=False)
    return Blip2Adapter("perf", model, processor, device)


def _qvlm_activation_settings() -> dict:
    from quantizers.config import ActivationQuant   # the measured tree's own (Q-VLM trees only)
    return {"a_bits": 4, "a_quant": ActivationQuant("tensor", "minmax")}


def vqav2_prompt(adapter, sample):
    """The VQAv2 prompt through whichever API the measured tree has."""
    if hasattr(adapter, "vqa_prompt"):
        return adapter.vqa_prompt(sample.question)
    if hasattr(adapter, "short_answer_prompt"):
        return adapter.short_answer_prompt(sample.question)
    return adapter.prompt("short_answer", question=sample.question)


def pool_memory(args, torch, device, samples, report) -> None:
    """The runtime's model pool on one config, in place and with a deep copy per config."""
    from fixtures.runtime.grid import Case, ModelSpec, TaskSpec
    from fixtures.runtime.models import ModelPool
    from quantizers.config import make_config
    from tasks import vqav2

    path = args.pool_config if Path(args.pool_config).is_absolute() else f"fixtures/configs/{args.pool_config}"
    spec = ModelSpec("pool", "llava", path, "bfloat16" if device.type == "cuda" else "float32", random_init=True)
    case = Case(spec, make_config("rtn-w4g128-language", "rtn", {"language": 4}, group_size=128), TaskSpec("vqav2"))
    for copy in [choice == "yes" for choice in args.pool_copy.split(",")]:
        pool = ModelPool(device, Path("/tmp/vqb-perf-cache"), copy=copy)
        with Clock(torch, device) as clock:
            fp = pool.fp(spec)
            adapter, _ = pool.quantized(case, lambda a: None)
            vqav2.evaluate(adapter, samples[:2 * args.pool_batch], batch_size=args.pool_batch, progress=False)
        report(work="pool", model=args.pool_config, copy_per_config=copy, batch=args.pool_batch,
               seconds=round(clock.seconds, 1), peak_gb=round(clock.peak_gb, 1), fits_80gb=clock.peak_gb * 2**30 < 80e9)
        del pool, fp, adapter
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
