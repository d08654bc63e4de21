"""quantize(adapter, config): the one entry point (as torchao's quantize_): pick the targets,
run the method, prove coverage, attach activation quantization, account bits per weight, and
describe the result as a cache entry (integer codes + scales) that restores it bit-identically."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantizers import rtn
from quantizers.awq import ExplicitInputScale, SCALE_BUFFER
from quantizers.blockwise import BlockOutput, awq_block, gptq_block
from quantizers.bpw import FP_BITS, LayerRecord, bits_per_weight
from quantizers.cache import QuantEntry, QuantizedWeight, apply_entry
from quantizers.calibration import walk
from quantizers.config import IMPLEMENTED_METHODS, ConfigError, QuantConfig
from quantizers.primitives import fake_quantize_activation
from quantizers.targets import Target, select_targets

CALIBRATED = ("gptq", "awq")


class CoverageError(RuntimeError):
    """A targeted layer was left unchanged, or an untargeted parameter was changed."""


@dataclass
class QuantReport:
    config: QuantConfig
    layers: list[LayerRecord] = field(default_factory=list)
    bpw: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    backend: str = "fake-quant"   # weights rounded and written back in the model's dtype
    details: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False

    def to_meta(self) -> dict:
        return {"layers": [r.__dict__ for r in self.layers], "bpw": self.bpw, "seconds": self.seconds,
                "backend": self.backend, "details": self.details}

    @classmethod
    def from_meta(cls, config: QuantConfig, meta: dict) -> "QuantReport":
        return cls(config, [LayerRecord(**r) for r in meta["layers"]], meta["bpw"], meta["seconds"],
                   meta["backend"], meta["details"], from_cache=True)


def _fingerprints(model: nn.Module) -> dict[str, str]:
    return {name: hashlib.blake2b(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(),
                                  digest_size=16).hexdigest()
            for name, p in model.named_parameters()}


def check_coverage(before: dict[str, str], after: dict[str, str], targets: list[Target],
                   allowed: set[str] = frozenset()) -> None:
    """Every targeted weight changed and nothing else did (mmq silently skipped layers), except
    parameters the method declares it changed on purpose (AWQ's folds into norms)."""
    expected = {f"{t.name}.weight" for t in targets}
    changed = {name for name in before if before[name] != after[name]}
    untouched = sorted(expected - changed)
    stray = sorted(changed - expected - set(allowed))
    if untouched or stray:
        raise CoverageError("quantization coverage broken: "
                            + (f"targeted but unchanged: {', '.join(untouched)}; " if untouched else "")
                            + (f"changed but not targeted: {', '.join(stray)}" if stray else ""))


def _attach_activation_quant(targets: list[Target], bits: int) -> None:
    for target in targets:
        target.module.register_forward_pre_hook(
            lambda module, args: (fake_quantize_activation(args[0], bits), *args[1:]))


def _run_method(adapter, targets, config, batches, progress) -> list[BlockOutput]:
    if config.method == "rtn":
        return [rtn.quantize_targets(targets, config)]
    if not batches:
        raise ConfigError(f"config {config.name!r}: method {config.method} needs calibration data")
    seed = int(dict(config.params).get("seed", 0))
    block_fn = {"gptq": lambda block, feed: gptq_block(block, feed, config),
                "awq": lambda block, feed: awq_block(block, feed, config, seed)}[config.method]
    return walk(adapter, targets, batches, block_fn, progress)


def quantize(adapter, config: QuantConfig, batches: list[dict] | None = None,
             progress: bool = False) -> tuple[QuantReport, QuantEntry | None]:
    """Quantize adapter.model in place; returns the report and the cache entry describing it."""
    components = dict(adapter.components)
    if config.method == "fp":
        return QuantReport(config, bpw={k: float(FP_BITS) for k in ["model", *components]}), None
    if config.method not in IMPLEMENTED_METHODS:
        raise ConfigError(f"config {config.name!r}: method {config.method!r} is not implemented yet "
                          f"(implemented: {', '.join(IMPLEMENTED_METHODS)})")
    started = time.perf_counter()
    targets = select_targets(adapter, config)
    before = _fingerprints(adapter.model)
    outputs = _run_method(adapter, targets, config, batches, progress)
    changed = set().union(*(o.changed for o in outputs))
    check_coverage(before, _fingerprints(adapter.model), targets, changed)
    layers = [record for o in outputs for record in o.layers]
    details = {name: d for o in outputs for name, d in o.details.items()}
    if config.a_bits and config.a_bits < FP_BITS:
        _attach_activation_quant(targets, config.a_bits)
    report = QuantReport(config, layers, bits_per_weight(adapter.model, layers, components),
                         time.perf_counter() - started, details=details)
    return report, _entry(adapter.model, outputs, changed, config, report)


def _entry(model: nn.Module, outputs: list[BlockOutput], changed: set[str], config: QuantConfig,
           report: QuantReport) -> QuantEntry:
    params = dict(model.named_parameters())
    weights = {f"{name}.weight": QuantizedWeight(q.codes.cpu(), q.scale.cpu(), q.zero.cpu(),
                                                 q.column_groups(config.group_size).cpu())
               for o in outputs for name, q in o.quantized.items()}
    buffers = {name: b.detach().cpu() for name, b in model.named_buffers() if name.endswith(SCALE_BUFFER)}
    raw = {name: params[name].detach().cpu().clone() for name in changed}
    return QuantEntry(weights, raw, buffers, report.to_meta())


def restore(adapter, config: QuantConfig, entry: QuantEntry) -> QuantReport:
    """Apply a cached entry to a fresh FP copy: weights, folded parameters, explicit scales."""
    apply_entry(adapter.model, entry)
    for name, value in entry.buffers.items():
        owner, _, buffer = name.rpartition(".")
        module = adapter.model.get_submodule(owner)
        module.register_buffer(buffer, value.to(module.weight.device))
        module.register_forward_pre_hook(ExplicitInputScale())
    if config.a_bits and config.a_bits < FP_BITS:
        _attach_activation_quant(select_targets(adapter, config), config.a_bits)
    return QuantReport.from_meta(config, entry.meta)
