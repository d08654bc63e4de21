"""Activation quantization: fake-quantizers on the inputs of the targeted Linears.

A config's activation setting is `a_bits` plus `a_quant` (ActivationQuant):
- granularity `token`: dynamic, one grid per token computed from that token's values at run time
  (no calibration; what W4A8 schemes such as QIG's use);
- granularity `tensor` / `channel`: static, one grid per Linear input (or per input channel)
  fixed from the calibration split, as integer kernels need and as Q-VLM's paper quantizes;
- clip `minmax` takes the observed extremes; `percentile` the p-th and (1-p)-th percentiles
  (per calibration batch, averaged over batches), which trades clipping error on outliers for
  resolution on everything else;
- sym: a grid symmetric around zero, or asymmetric with a zero point.
The hook runs on every forward, so prefill and each decode step are quantized alike (a static
grid is the same in both; a dynamic one follows each new token).

Static ranges are part of the quantized model: api.quantize stores them in the cache entry's
state under `activation::<linear>::lo|hi` and attaches the hooks again from there.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from quantizers.config import ActivationQuant
from quantizers.primitives import QuantizationHook, grid_params_from_range, quantize_with

STATE_PREFIX = "activation::"
Range = tuple[torch.Tensor, torch.Tensor]


# -- arithmetic ---------------------------------------------------------------------------------
def quantize_dynamic(x: torch.Tensor, bits: int, sym: bool = False) -> torch.Tensor:
    """Per-token fake quantization (the last dim holds the channels): each token its own grid."""
    flat = x.float().reshape(-1, x.shape[-1])
    scale, zero = grid_params_from_range(flat.amin(dim=-1, keepdim=True), flat.amax(dim=-1, keepdim=True), bits, sym)
    return quantize_with(flat, scale, zero, bits)[1].reshape(x.shape).to(x.dtype)


def quantize_static(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool = False) -> torch.Tensor:
    """Fake quantization on a fixed grid from [lo, hi] (scalars, or one per channel); values
    outside the range are clipped to its ends."""
    scale, zero = grid_params_from_range(lo.float(), hi.float(), bits, sym)
    return quantize_with(x.float(), scale, zero, bits)[1].to(x.dtype)


def observed_range(x: torch.Tensor, spec: ActivationQuant, percentile: float | None = None) -> Range:
    """(lo, hi) of one batch of a Linear's input: over all values (tensor) or per channel."""
    p = spec.percentile if percentile is None else percentile
    flat = x.detach().float().reshape(-1, x.shape[-1])
    if spec.granularity == "channel":
        flat = flat.T          # channels first: one range per channel, over the tokens
    else:
        flat = flat.reshape(1, -1)
    if spec.clip == "minmax" or p >= 1.0:
        return flat.amin(dim=-1), flat.amax(dim=-1)
    n = flat.shape[-1]
    low_k, high_k = max(1, round((1 - p) * n)), max(1, min(n, round(p * n)))
    return flat.kthvalue(low_k, dim=-1).values, flat.kthvalue(high_k, dim=-1).values


def combine_ranges(ranges: list[Range], spec: ActivationQuant) -> Range:
    """One range from per-batch ranges: the extremes for min-max, the mean for percentiles."""
    lows, highs = torch.stack([r[0] for r in ranges]), torch.stack([r[1] for r in ranges])
    if spec.clip == "minmax":
        return lows.amin(dim=0), highs.amax(dim=0)
    return lows.mean(dim=0), highs.mean(dim=0)


# -- hooks --------------------------------------------------------------------------------------
class ActivationQuantizer(QuantizationHook):
    """Forward pre-hook on a Linear: fake-quantize its input, dynamically or on a fixed range."""

    def __init__(self, bits: int, spec: ActivationQuant, value_range: Range | None = None):
        if spec.static and value_range is None:
            raise ValueError("a static activation quantizer needs a calibrated range")
        self.bits, self.spec = bits, spec
        self.range = value_range

    def __call__(self, module, args):
        x = args[0]
        if self.spec.static:
            lo, hi = (t.to(x.device) for t in self.range)
            return (quantize_static(x, lo, hi, self.bits, self.spec.sym), *args[1:])
        return (quantize_dynamic(x, self.bits, self.spec.sym), *args[1:])


def attach(modules: Mapping[str, nn.Module], bits: int, spec: ActivationQuant,
           ranges: Mapping[str, Range] | None = None) -> list:
    """One quantizer per named Linear; returns the hook handles."""
    missing = [name for name in modules if spec.static and name not in (ranges or {})]
    if missing:
        raise ValueError(f"static activation quantization: no calibrated range for {', '.join(missing[:3])}")
    return [module.register_forward_pre_hook(ActivationQuantizer(bits, spec, (ranges or {}).get(name)))
            for name, module in modules.items()]


@torch.no_grad()
def calibrate_ranges(model: nn.Module, modules: Mapping[str, nn.Module], batches: list[dict],
                     spec: ActivationQuant) -> dict[str, Range]:
    """Run the calibration batches and return each Linear's input range under spec's clip."""
    seen: dict[str, list[Range]] = {name: [] for name in modules}
    handles = [module.register_forward_pre_hook(
        lambda m, args, name=name: seen[name].append(observed_range(args[0], spec)))
        for name, module in modules.items()]
    try:
        for batch in batches:
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    never = [name for name, ranges in seen.items() if not ranges]
    if never:
        raise RuntimeError(f"activation calibration: no input reached {', '.join(never[:3])}")
    return {name: combine_ranges(ranges, spec) for name, ranges in seen.items()}


def ranges_to_state(ranges: Mapping[str, Range]) -> dict[str, torch.Tensor]:
    state = {}
    for name, (lo, hi) in ranges.items():
        state[f"{STATE_PREFIX}{name}::lo"] = lo.detach().float().cpu()
        state[f"{STATE_PREFIX}{name}::hi"] = hi.detach().float().cpu()
    return state


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, Range], dict[str, torch.Tensor]]:
    """(activation ranges by Linear name, the method's own state) of a cache entry's state."""
    lows, highs, rest = {}, {}, {}
    for key, tensor in state.items():
        if key.startswith(STATE_PREFIX):
            name, _, end = key[len(STATE_PREFIX):].rpartition("::")
            (lows if end == "lo" else highs)[name] = tensor
        else:
            rest[key] = tensor
    return {name: (lows[name], highs[name]) for name in lows}, rest
