"""quantize(adapter, config): the one entry point (as torchao's quantize_): pick the targets,
run the method, prove coverage, attach activation quantization, account bits per weight."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from quantizers import rtn
from quantizers.bpw import FP_BITS, LayerRecord, bits_per_weight
from quantizers.config import IMPLEMENTED_METHODS, ConfigError, QuantConfig
from quantizers.primitives import fake_quantize_activation
from quantizers.targets import Target, select_targets

METHOD_FUNCTIONS = {"rtn": rtn.quantize_targets}


class CoverageError(RuntimeError):
    """A targeted layer was left unchanged, or an untargeted parameter was changed."""


@dataclass
class QuantReport:
    config: QuantConfig
    layers: list[LayerRecord] = field(default_factory=list)
    bpw: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    backend: str = "fake-quant"   # weights rounded and written back in the model's dtype


def _fingerprints(model: nn.Module) -> dict[str, str]:
    return {name: hashlib.blake2b(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(),
                                  digest_size=16).hexdigest()
            for name, p in model.named_parameters()}


def check_coverage(before: dict[str, str], after: dict[str, str], targets: list[Target]) -> None:
    """Every targeted weight changed and nothing else did (mmq silently skipped layers)."""
    expected = {f"{t.name}.weight" for t in targets}
    changed = {name for name in before if before[name] != after[name]}
    untouched = sorted(expected - changed)
    stray = sorted(changed - expected)
    if untouched or stray:
        raise CoverageError("quantization coverage broken: "
                            + (f"targeted but unchanged: {', '.join(untouched)}; " if untouched else "")
                            + (f"changed but not targeted: {', '.join(stray)}" if stray else ""))


def _attach_activation_quant(targets: list[Target], bits: int) -> None:
    for target in targets:
        target.module.register_forward_pre_hook(
            lambda module, args: (fake_quantize_activation(args[0], bits), *args[1:]))


def quantize(adapter, config: QuantConfig, calibration=None) -> QuantReport:
    """Quantize adapter.model in place according to config."""
    components = {c: adapter.components[c] for c in adapter.components}
    if config.method == "fp":
        return QuantReport(config, bpw={k: float(FP_BITS) for k in ["model", *components]})
    if config.method not in IMPLEMENTED_METHODS:
        raise ConfigError(f"config {config.name!r}: method {config.method!r} is not implemented yet "
                          f"(implemented: {', '.join(IMPLEMENTED_METHODS)})")
    started = time.perf_counter()
    targets = select_targets(adapter, config)
    before = _fingerprints(adapter.model)
    layers = METHOD_FUNCTIONS[config.method](targets, config, calibration)
    check_coverage(before, _fingerprints(adapter.model), targets)
    if config.a_bits and config.a_bits < FP_BITS:
        _attach_activation_quant(targets, config.a_bits)
    bpw = bits_per_weight(adapter.model, layers, components)
    return QuantReport(config, layers, bpw, time.perf_counter() - started)
