"""Cross-check our GPTQ and AWQ against llm-compressor on a tiny trained Llama, on CPU.

    python -m benchmarks.crosscheck.llmcompressor_check [--bits 4] [--group-size 128] [--sym]
                                                        [--out FILE.json]

Runs in the separate venv of benchmarks/crosscheck/README.md: llm-compressor pins
torch<=2.14.0 and transformers<=5.17, older than the project's main environment.

What it does, all seeded and offline (no model hub, no dataset hub):
1. Builds a tiny random LlamaForCausalLM and trains it for a few hundred steps on a synthetic
   language (a motif drawn from a sparse seeded Markov chain, repeated to fill the sequence), so
   it has learned something that quantization can damage.
2. Quantizes copies of it with our RTN, GPTQ and AWQ through quantizers.api.quantize (the same
   walker the suite uses: block by block, inputs of block i from quantized blocks < i) via a
   minimal in-file adapter for a plain causal LM, and with llm-compressor's GPTQModifier and
   AWQModifier + QuantizationModifier through `oneshot` with the sequential pipeline, on the same
   calibration tokens.
3. Reports the mean token NLL on held-out sequences, per-Linear output error on FP inputs,
   per-block hidden-state error, and the relative difference between the two GPTQ weights.

llm-compressor computes group scales once from the original weights (static groups), so ours is
also run with static_groups=True: with act-order off, the same damping and block size, that pair
should agree up to float rounding, which makes a bug on either side visible. Our default (dynamic
groups, scales from the error-updated weights) is reported beside it. llm-compressor's AWQ has
no clip search and defaults to duo scaling; we run it with duo_scaling=False (the reference
llm-awq's activation-only scales, as ours) and report ours with and without its clip search.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

# Offline before transformers/datasets/llmcompressor are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# llm-compressor logs to stdout; keep stdout for the table.
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fixtures.adapters.base import ModelAdapter  # noqa: E402
from fixtures.adapters.layouts import LLAMA  # noqa: E402
from quantizers.api import quantize  # noqa: E402
from quantizers.config import make_config  # noqa: E402


@dataclass(frozen=True)
class Setup:
    vocab: int = 512
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    seq_len: int = 64
    motif_len: int = 16        # each sequence is one Markov motif repeated to seq_len
    successors: int = 4        # next-token choices per token in the Markov chain
    train_steps: int = 400
    train_batch: int = 32
    lr: float = 3e-3
    n_calib: int = 64
    calib_batch: int = 8
    n_eval: int = 128
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    damp: float = 0.01
    block_size: int = 128
    seed: int = 0
    # One thread: the matmuls are tiny, so more threads mostly add overhead, and on a shared
    # machine oversubscription made a training step 10x slower.
    threads: int = 1


# -- data and model -------------------------------------------------------------------------------
def markov_chain(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """(successors (V, k), probabilities (V, k)) of a sparse seeded first-order chain."""
    g = torch.Generator().manual_seed(setup.seed)
    succ = torch.stack([torch.randperm(setup.vocab, generator=g)[:setup.successors]
                        for _ in range(setup.vocab)])
    # Normalized exponentials: a flat Dirichlet draw, through the seeded generator.
    probs = -torch.log(torch.rand(setup.vocab, setup.successors, generator=g).clamp_min(1e-12))
    return succ, probs / probs.sum(dim=1, keepdim=True)


def sample_tokens(setup: Setup, chain, n: int, seed: int) -> torch.Tensor:
    """n sequences (n, seq_len): a motif of motif_len chain steps, repeated. Position t >= motif_len
    is predictable by copying from t - motif_len; the motif itself only through the chain."""
    succ, probs = chain
    g = torch.Generator().manual_seed(seed)
    motif = torch.empty(n, setup.motif_len, dtype=torch.long)
    motif[:, 0] = torch.randint(setup.vocab, (n,), generator=g)
    for t in range(1, setup.motif_len):
        choice = torch.multinomial(probs[motif[:, t - 1]], 1, generator=g)[:, 0]
        motif[:, t] = succ[motif[:, t - 1], choice]
    reps = -(-setup.seq_len // setup.motif_len)
    return motif.repeat(1, reps)[:, :setup.seq_len].contiguous()


# Disjoint seeds for the three splits: calibration never sees eval data.
TRAIN_SEED, CALIB_SEED, EVAL_SEED = 1000, 2000, 3000


def build_model(setup: Setup) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=setup.vocab, hidden_size=setup.hidden,
                         intermediate_size=setup.intermediate, num_hidden_layers=setup.layers,
                         num_attention_heads=setup.heads, num_key_value_heads=setup.heads,
                         max_position_embeddings=2 * setup.seq_len, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(setup.seed)
    return LlamaForCausalLM(config).float()


def train(model: LlamaForCausalLM, setup: Setup, chain) -> list[float]:
    """A few hundred AdamW steps on fresh batches of the synthetic language; returns the losses."""
    torch.manual_seed(setup.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=setup.lr, total_steps=setup.train_steps,
                                                   pct_start=0.1)
    model.train()
    losses = []
    for step in range(setup.train_steps):
        ids = sample_tokens(setup, chain, setup.train_batch, TRAIN_SEED + step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def mean_nll(model: nn.Module, ids: torch.Tensor, batch: int = 32) -> float:
    """Mean next-token NLL over every predicted position of the eval sequences."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch):
        x = ids[start:start + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                          reduction="sum")
        total, count = total + nll.item(), count + x[:, 1:].numel()
    return total / count


# -- our path -------------------------------------------------------------------------------------
class CausalLMAdapter(ModelAdapter):
    """The adapter contract for a plain Llama causal LM built in memory: the decoder stack is the
    `language` component (Llama's block layout), lm_head stays in full precision. Calibration
    batches are token ids, so there is nothing to encode or load."""
    family = "causal-lm"
    components = {"language": "model", "lm_head": "lm_head"}
    protected = ("lm_head",)
    stacks = {"language": "layers"}
    layouts = {"language": LLAMA}

    def __init__(self, model: nn.Module, name: str = "tiny-llama"):
        super().__init__(name, model, None, torch.device("cpu"))

    @classmethod
    def load(cls, *args, **kwargs):
        raise NotImplementedError("the cross-check builds its model in memory")

    def encode(self, images, texts):
        raise NotImplementedError("the cross-check calibrates on token ids")


def calibration_batches(calib: torch.Tensor, batch: int) -> list[dict]:
    return [{"input_ids": calib[i:i + batch], "attention_mask": torch.ones_like(calib[i:i + batch])}
            for i in range(0, calib.shape[0], batch)]


def run_ours(fp_model, setup: Setup, method: str, calib: torch.Tensor, **params) -> nn.Module:
    model = copy.deepcopy(fp_model)
    config = make_config(f"ours-{method}", method, {"language": setup.bits}, group_size=setup.group_size,
                         sym=setup.sym, params=params)
    quantize(CausalLMAdapter(model), config, calibration_batches(calib, setup.calib_batch))
    return model


# -- llm-compressor path --------------------------------------------------------------------------
def word_level_tokenizer(vocab: int):
    """oneshot insists on a processor when given a dataset; this one is built in memory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", bos_token="t0", eos_token="t1")


def weight_args(setup: Setup):
    from compressed_tensors.quantization import QuantizationArgs

    grouped = setup.group_size != -1
    return QuantizationArgs(num_bits=setup.bits, type="int", symmetric=setup.sym,
                            strategy="group" if grouped else "channel",
                            group_size=setup.group_size if grouped else None,
                            observer="memoryless_minmax", actorder=None)


def scheme_groups(setup: Setup) -> dict:
    from compressed_tensors.quantization import QuantizationScheme

    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weight_args(setup))}


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a quantized module computes with: its own fake quantization applied to the
    stored weight (idempotent after GPTQ, which writes dequantized values; needed where a
    modifier only sets scales and leaves rounding to the forward pass)."""
    from compressed_tensors.quantization import fake_quantize

    scale = getattr(module, "weight_scale", None)
    if scale is None:
        return module.weight.detach().clone()
    zero = getattr(module, "weight_zero_point", None)   # act-order is off: no g_idx to honour
    return fake_quantize(module.weight.detach(), scale, zero, module.quantization_scheme.weights).clone()


def run_llmcompressor(fp_model, setup: Setup, recipe, calib: torch.Tensor) -> nn.Module:
    """Run oneshot on a copy, then write its effective weights (and any parameter it changed,
    e.g. AWQ's norm folds) into a clean copy without compressed-tensors hooks, which is evaluated."""
    from datasets import Dataset
    from llmcompressor import oneshot

    work = copy.deepcopy(fp_model)
    dataset = Dataset.from_dict({"input_ids": calib.tolist(),
                                 "attention_mask": torch.ones_like(calib).tolist()})
    with tempfile.TemporaryDirectory() as config_dir:
        # oneshot re-reads the config from model.config.name_or_path (Oneshot.validate_model)
        # even for an in-memory model; an empty name means a hub lookup of "". Give it a local one.
        work.config.save_pretrained(config_dir)
        work.config.name_or_path = config_dir
        with cpu_without_pinning():
            oneshot(model=work, recipe=recipe, dataset=dataset, processor=word_level_tokenizer(setup.vocab),
                    num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False,
                    batch_size=setup.calib_batch, max_seq_length=setup.seq_len, pipeline="sequential",
                    output_dir=None, log_dir=None)
    clean = copy.deepcopy(fp_model)
    targets = {name for name, m in clean.named_modules() if isinstance(m, nn.Linear)}
    state = clean.state_dict()
    with torch.no_grad():
        theirs = work.state_dict()
        for name in state:   # everything oneshot may have changed (norm folds); skips its qparams
            state[name].copy_(theirs[name])
        for name, module in work.named_modules():
            if name in targets:
                state[f"{name}.weight"].copy_(effective_weight(module))
    clean.load_state_dict(state)
    return clean.eval()


def llmc_gptq_recipe(setup: Setup):
    from llmcompressor.modifiers.gptq import GPTQModifier

    return GPTQModifier(config_groups=scheme_groups(setup), ignore=["lm_head"], actorder=None,
                        dampening_frac=setup.damp, block_size=setup.block_size)


@contextlib.contextmanager
def cpu_without_pinning():
    """llm-compressor 0.14.0.1's AWQModifier pins its cached activations (IntermediatesCache.
    pin_memory, an H2D transfer speed-up) unconditionally, which raises "Cannot access
    accelerator device when none is available" on a CPU-only torch. Pinning changes no value, so
    on such a machine it is made a no-op for the duration of the run; elsewhere nothing changes."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


def llmc_awq_recipe(setup: Setup):
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(duo_scaling=False),
            QuantizationModifier(config_groups=scheme_groups(setup), ignore=["lm_head"])]


# -- metrics --------------------------------------------------------------------------------------
def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]


@torch.no_grad()
def fp_linear_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs, handles = {}, []
    for name in linear_names(model):
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))))
    model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return inputs


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def linear_output_errors(fp_model, model, inputs) -> dict[str, float]:
    """Per Linear: relative error of x W_q^T against x W^T on the FP model's own inputs. Only
    meaningful for methods that change nothing but the Linear weights (RTN, GPTQ)."""
    return {name: relative(x @ model.get_submodule(name).weight.T, x @ fp_model.get_submodule(name).weight.T)
            for name, x in inputs.items()}


@torch.no_grad()
def block_output_errors(fp_model, model, ids) -> list[float]:
    """Per decoder layer: relative error of its output hidden states against the FP model's,
    end to end from the same tokens (valid for every method, AWQ folds included)."""
    ref = fp_model(input_ids=ids, output_hidden_states=True).hidden_states
    got = model(input_ids=ids, output_hidden_states=True).hidden_states
    return [relative(got[i], ref[i]) for i in range(1, len(ref))]


@torch.no_grad()
def weight_differences(a: nn.Module, b: nn.Module) -> dict[str, dict[str, float]]:
    out = {}
    for name in linear_names(a):
        wa, wb = a.get_submodule(name).weight, b.get_submodule(name).weight
        out[name] = {"rel_diff": relative(wa, wb),
                     "frac_differ": (~torch.isclose(wa, wb, rtol=1e-5, atol=1e-7)).float().mean().item()}
    return out


# -- driver ---------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for package in ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = "absent"
    found["python"] = sys.version.split()[0]
    return found


def run_check(setup: Setup, with_awq: bool = True, log=print) -> dict:
    torch.set_num_threads(setup.threads)
    chain = markov_chain(setup)
    fp = build_model(setup)
    started = time.perf_counter()
    train_losses = train(fp, setup, chain)
    log(f"trained {setup.train_steps} steps in {time.perf_counter() - started:.1f}s, "
        f"final train loss {sum(train_losses[-20:]) / 20:.3f}")
    calib = sample_tokens(setup, chain, setup.n_calib, CALIB_SEED)
    evals = sample_tokens(setup, chain, setup.n_eval, EVAL_SEED)
    probe = evals[:16]

    gptq = {"damp": setup.damp, "act_order": False, "block_size": setup.block_size}
    runs: dict[str, Callable[[], nn.Module]] = {
        "rtn (ours)": lambda: run_ours(fp, setup, "rtn", calib),
        "gptq ours (dynamic groups)": lambda: run_ours(fp, setup, "gptq", calib, **gptq),
        "gptq ours (static groups)": lambda: run_ours(fp, setup, "gptq", calib, static_groups=True, **gptq),
        "gptq llm-compressor": lambda: run_llmcompressor(fp, setup, llmc_gptq_recipe(setup), calib),
    }
    if with_awq:
        runs.update({
            "awq ours (clip search)": lambda: run_ours(fp, setup, "awq", calib, seed=setup.seed),
            "awq ours (no clip)": lambda: run_ours(fp, setup, "awq", calib, seed=setup.seed, clip=False),
            "awq llm-compressor": lambda: run_llmcompressor(fp, setup, llmc_awq_recipe(setup), calib),
        })

    fp_nll = mean_nll(fp, evals)
    inputs = fp_linear_inputs(fp, probe)
    results = {"fp": {"nll": fp_nll, "seconds": 0.0, "block_error": [0.0] * setup.layers}}
    models, failures = {}, {}
    for label, make in runs.items():
        started = time.perf_counter()
        try:
            model = make()
        except Exception as err:  # reported, not hidden: the table says why a row is missing
            failures[label] = f"{type(err).__name__}: {err}"
            log(f"{label}: FAILED {failures[label]}")
            continue
        seconds = time.perf_counter() - started
        models[label] = model
        results[label] = {"nll": mean_nll(model, evals), "seconds": seconds,
                          "block_error": block_output_errors(fp, model, probe)}
        if not label.startswith("awq"):
            results[label]["linear_error"] = linear_output_errors(fp, model, inputs)
        log(f"{label}: nll {results[label]['nll']:.4f} ({seconds:.1f}s)")
    for label, r in results.items():
        r["delta_nll"] = r["nll"] - fp_nll
        r["ppl"] = math.exp(r["nll"])

    diffs = {}
    theirs = models.get("gptq llm-compressor")
    for label in ("gptq ours (static groups)", "gptq ours (dynamic groups)"):
        if theirs is not None and label in models:
            diffs[f"{label} vs gptq llm-compressor"] = weight_differences(models[label], theirs)
    notes = ["ours: quantizers.api.quantize (calibration walker + the gptq/awq methods) through an "
             "in-file causal-LM adapter; lm_head and embeddings left in FP on both sides",
             "llm-compressor: oneshot(pipeline='sequential'), config.name_or_path pointed at a temp dir "
             "holding the config (validate_model re-reads it), in-memory WordLevel tokenizer as processor",
             "llm-compressor weights evaluated as fake_quantize(weight, weight_scale, weight_zero_point) "
             "copied into a clean FP copy (plus any other changed parameter, e.g. AWQ's norm folds)"]
    if with_awq and not torch.accelerator.is_available():
        notes.append("AWQ on CPU: IntermediatesCache.pin_memory made a no-op during oneshot "
                     "(llm-compressor pins unconditionally and fails without an accelerator)")
    return {"versions": versions(), "setup": asdict(setup), "final_train_loss": sum(train_losses[-20:]) / 20,
            "results": results, "gptq_weight_diff": diffs, "failures": failures, "notes": notes}


def markdown(report: dict) -> str:
    res = report["results"]
    lines = ["| method | eval NLL | delta vs FP | ppl | block out. rel. err (per layer) | seconds |",
             "|---|---|---|---|---|---|"]
    for label, r in res.items():
        blocks = ", ".join(f"{e:.4f}" for e in r["block_error"])
        lines.append(f"| {label} | {r['nll']:.4f} | {r['delta_nll']:+.4f} | {r['ppl']:.3f} | {blocks} | "
                     f"{r['seconds']:.1f} |")
    with_linear = [label for label, r in res.items() if "linear_error" in r]
    if with_linear:
        lines += ["", "Per-Linear output rel. error vs FP (FP inputs):", "",
                  "| layer | " + " | ".join(with_linear) + " |", "|---|" + "---|" * len(with_linear)]
        for name in res[with_linear[0]]["linear_error"]:
            short = name.replace("model.layers.", "L")
            lines.append(f"| {short} | " + " | ".join(f"{res[m]['linear_error'][name]:.4f}" for m in with_linear)
                         + " |")
    for pair, layers in report["gptq_weight_diff"].items():
        lines += ["", f"GPTQ weights, {pair}:", "", "| layer | rel. diff | frac. elements differing |",
                  "|---|---|---|"]
        lines += [f"| {n.replace('model.layers.', 'L')} | {d['rel_diff']:.2e} | {d['frac_differ']:.4f} |"
                  for n, d in layers.items()]
    for label, why in report["failures"].items():
        lines += ["", f"**{label} did not run:** {why}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128, help="-1: per output channel")
    parser.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    parser.add_argument("--train-steps", type=int, default=Setup.train_steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=Setup.threads, help="torch CPU threads")
    parser.add_argument("--no-awq", action="store_true")
    parser.add_argument("--out", default=None, help="write the full report as JSON here")
    args = parser.parse_args(argv)
    setup = Setup(bits=args.bits, group_size=args.group_size, sym=args.sym, train_steps=args.train_steps,
                  seed=args.seed, threads=args.threads)
    report = run_check(setup, with_awq=not args.no_awq, log=lambda m: print(m, file=sys.stderr))
    v = report["versions"]
    print(f"W{setup.bits} g{setup.group_size} {'sym' if setup.sym else 'asym'}; torch {v['torch']}, "
          f"transformers {v['transformers']}, llmcompressor {v['llmcompressor']}, "
          f"compressed-tensors {v['compressed-tensors']}\n")
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
