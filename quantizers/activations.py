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


def _by_range(x: torch.Tensor, spec: ActivationQuant) -> torch.Tensor:
    """x as rows whose extremes are one range each: one row (tensor) or a row per channel."""
    flat = x.detach().float().reshape(-1, x.shape[-1])
    return flat.T if spec.granularity == "channel" else flat.reshape(1, -1)


def _order_ranks(n: int, p: float) -> tuple[int, int]:
    """1-based ranks of the low and high clipping points of percentile p among n values."""
    return max(1, round((1 - p) * n)), max(1, min(n, round(p * n)))


def observed_range(x: torch.Tensor, spec: ActivationQuant, percentile: float | None = None) -> Range:
    """(lo, hi) of one batch of a Linear's input: over all values (tensor) or per channel."""
    p = spec.percentile if percentile is None else percentile
    return observed_ranges(x, spec, [p])[p]


def observed_ranges(x: torch.Tensor, spec: ActivationQuant, percentiles: list[float],
                    sort: bool | None = None) -> dict[float, Range]:
    """observed_range at several percentiles at once (p >= 1 or clip minmax: the extremes).

    Order statistics are exact, so every way of finding them gives the same values. On a GPU the
    values are sorted once and read at each rank: torch's CUDA kthvalue selects within one thread
    block per row, which takes seconds on a 40M-value activation (one row per tensor), where a
    device-wide sort takes milliseconds. On the host, kthvalue's linear selection wins. `sort`
    forces either way (None: sort on CUDA)."""
    rows = _by_range(x, spec)
    n = rows.shape[-1]
    clipped = [p for p in percentiles if spec.clip != "minmax" and p < 1.0]
    sort = rows.is_cuda if sort is None else sort
    ordered = rows.sort(dim=-1).values if clipped and sort else None
    out = {}
    for p in percentiles:
        if p not in clipped:
            out[p] = rows.amin(dim=-1), rows.amax(dim=-1)
            continue
        low_k, high_k = _order_ranks(n, p)
        if ordered is not None:
            out[p] = ordered[:, low_k - 1].clone(), ordered[:, high_k - 1].clone()
        else:
            out[p] = rows.kthvalue(low_k, dim=-1).values, rows.kthvalue(high_k, dim=-1).values
    return out


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
