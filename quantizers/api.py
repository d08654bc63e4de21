"""quantize(adapter, config): the one entry point (as torchao's quantize_): pick the targets,
run the config's method, prove coverage, attach activation quantization, account bits per
weight, and describe the result as a cache entry (integer codes + scales + the method's state)
that restores it bit-identically. Nothing here knows a method by name: it asks the method."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from quantizers import activations
from quantizers.bpw import FP_BITS, LayerRecord, bits_per_weight
from quantizers.cache import QuantEntry, apply_entry, change_markers
from quantizers.config import ConfigError, QuantConfig
from quantizers.methods import QuantOutput
from quantizers.primitives import host_copy
from quantizers.targets import Target, select_targets, unaccounted_weights


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


def check_coverage(before: dict, after: dict, targets: list[Target],
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


def watch_tokens(adapter, targets: list[Target]) -> tuple[activations.TokenMask | None, list]:
    """A TokenMask fed by the language model's attention mask, when a target is in it (ranges
    over real tokens only), with its hook handles."""
    if "language" not in {t.component for t in targets} or "language" not in adapter.components:
        return None, []
    tokens = activations.TokenMask()
    return tokens, tokens.watch(adapter.component("language"))


def _attach_activations(adapter, config: QuantConfig, targets: list[Target],
                        ranges: dict[str, activations.Range] | None) -> None:
    if config.quantizes_activations:
        tokens, _ = watch_tokens(adapter, targets)
        activations.attach({t.name: t.module for t in targets}, config.a_bits,
                           activations.plan(targets, config.a_quant, adapter.layout), ranges, tokens)


def _activation_ranges(adapter, config: QuantConfig, targets: list[Target], batches: list[dict] | None,
                       output: QuantOutput) -> dict[str, activations.Range]:
    """Static activation ranges: the method's own (Q-VLM searches them), else fitted on the
    calibration batches through the weight-quantized model."""
    if not (config.quantizes_activations and config.a_quant.static):
        return {}
    if output.activation_ranges:
        return output.activation_ranges
    tokens, handles = watch_tokens(adapter, targets)
    try:
        return activations.calibrate_ranges(adapter.model, {t.name: t.module for t in targets}, batches,
                                            activations.plan(targets, config.a_quant, adapter.layout), tokens)
    finally:
        for handle in handles:
            handle.remove()


def quantize(adapter, config: QuantConfig, batches: list[dict] | None = None,
             progress: bool = False) -> tuple[QuantReport, QuantEntry | None]:
    """Quantize adapter.model in place; returns the report and the cache entry describing it."""
    method = config.method
    components = dict(adapter.components)
    if not method.changes_weights:   # the baseline: nothing to build, nothing to cache
        return QuantReport(config, bpw={k: float(FP_BITS) for k in ["model", *components]}), None
    if config.calibrates and not batches:
        raise ConfigError(f"config {config.name!r}: method {method.name}"
                          + (" with static activation ranges" if not method.calibrates else "")
                          + " needs calibration data")
    started = time.perf_counter()
    targets = select_targets(adapter, config)
    before = change_markers(adapter.model)
    output: QuantOutput = method.quantize(adapter, targets, config, batches, progress)
    check_coverage(before, change_markers(adapter.model), targets, output.changed)
    left = unaccounted_weights(adapter, config, {f"{r.name}.weight" for r in output.layers})
    if left:
        raise CoverageError(f"config {config.name!r} on {adapter.name}: left at 16 bits, neither quantized nor "
                            f"protected with a reason by the {adapter.family} family: {', '.join(left)}")
    ranges = _activation_ranges(adapter, config, targets, batches, output)
    _attach_activations(adapter, config, targets, ranges)
    finish_device_work(adapter.model)
    report = QuantReport(config, output.layers, bits_per_weight(adapter.model, output.layers, components),
                         time.perf_counter() - started, details=output.details)
    params = dict(adapter.model.named_parameters())
    # Host copies the entry owns (on CPU too): the cache writes them behind the run as they are,
    # while the model goes on changing.
    state = {**method.state(adapter.model), **activations.ranges_to_state(ranges)}
    entry = QuantEntry({f"{name}.weight": q.to_host() for name, q in output.quantized.items()},
                       {name: host_copy(params[name].detach()) for name in output.changed},
                       {name: host_copy(tensor) for name, tensor in state.items()}, report.to_meta())
    finish_device_work(adapter.model)   # the host copies above were queued, not awaited
    return report, entry


def finish_device_work(model) -> None:
    """Wait for the kernels queued on the model's GPUs, so that the quantization seconds include
    the method's last kernels: CUDA runs them asynchronously, and they were charged to whatever
    waited next (the entry's copy to the host, outside every measured phase: a likely part of
    the 4.2-4.4 s "other" of two configs on the H100 perf grid)."""
    for device in {p.device for p in model.parameters() if p.is_cuda}:
        torch.cuda.synchronize(device)


def restore(adapter, config: QuantConfig, entry: QuantEntry) -> QuantReport:
    """Apply a cached entry to a fresh FP copy: weights, changed parameters, the method's state."""
    apply_entry(adapter.model, entry)
    ranges, method_state = activations.split_state(entry.state)
    config.method.restore(adapter.model, method_state)
    _attach_activations(adapter, config, select_targets(adapter, config), ranges)
    return QuantReport.from_meta(config, entry.meta)
