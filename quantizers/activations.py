"""Activation quantization: fake-quantizers on the inputs of the targeted Linears.

A config's activation setting is `a_bits` plus `a_quant` (ActivationQuant). Granularities:
- `token`: dynamic, one grid per token from that token's values at run time (no calibration;
  what W4A8 schemes such as QIG's use);
- `tensor` / `channel`: static, one grid per Linear input (or per input channel) fitted once on
  the calibration split, as integer kernels need;
- `position`: static, one grid per token position (over the channels): for inputs of a fixed
  length, the vision tower's patches (Q-VLM's code quantizes CLIP this way);
- `channel_dynamic`: one grid per input channel from the current input, per sequence over its
  real tokens (padding excluded); a decode step reuses its sequence's prefill range;
- `official`: Q-VLM's code's mix, resolved per Linear by `resolve`: vision Linears `position`;
  language Linears that read a norm's output (q/k/v, gate/up: the layout's norm folds)
  `channel`; the other language Linears (o_proj, down_proj, which read the attention's or the
  MLP's inner activations) `channel_dynamic`; Q-Former and connector Linears `channel`.
Static ranges: clip `minmax` takes the observed extremes; `percentile` the p-th and (1-p)-th
percentiles (per calibration batch, averaged over batches), trading clipping error on outliers
for resolution on everything else. sym: a grid symmetric around zero, or one with a zero point.

Decode steps (one new token per sequence): with `decode: clip` a generated token is quantized on
the range like any token; with `decode: widen` (the default of `official`) the range is widened
by the token's own extremes at the range's granularity, so a generated token is never clipped.
Q-VLM's code keeps a running range widened by every decode token of a request; ours widens by
the current token only, so a sequence's answer never depends on the other sequences of its
batch or on beam search's reordering (the token that matters, the current one, is unclipped in
both).

Static ranges are part of the quantized model: api.quantize stores them in the cache entry's
state under `activation::<linear>::lo|hi` and attaches the hooks again from there.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import torch
from torch import nn

from quantizers.params import ActivationQuant
from quantizers.primitives import QuantizationHook, grid_params_from_range, quantize_with

# Linears that read an inner activation of a block (after attention or the MLP's nonlinearity),
# by their last name part: how `official` tells them apart where a layout names no norm folds.
INNER_INPUT_LINEARS = ("o_proj", "out_proj", "down_proj", "fc2", "dense_4h_to_h", "wo", "w2")

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
    """x as rows whose extremes are one range each: one row (tensor), a row per channel, or a row
    per token position (x of shape (..., positions, channels))."""
    if spec.granularity == "position":
        return x.detach().float().transpose(-2, -1).reshape(-1, x.shape[-2]).T if x.dim() > 2 \
            else x.detach().float()
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


# -- which quantizer each Linear gets -----------------------------------------------------------
def reads_norm_output(linear_name: str, layout) -> bool:
    """Whether a Linear reads a norm's output (q/k/v, gate/up, fc1) rather than a block's inner
    activation: from the layout's norm folds, or by name where the layout names none."""
    if layout is not None and layout.norm_folds:
        return any(linear_name.endswith("." + path) for _, paths in layout.norm_folds for path in paths)
    return linear_name.rsplit(".", 1)[-1] not in INNER_INPUT_LINEARS


def resolve(spec: ActivationQuant, component: str, linear_name: str, layout=None) -> ActivationQuant:
    """The concrete quantizer of one Linear: `official` picks per role (module docstring)."""
    if spec.granularity != "official":
        return spec
    if component == "vision":
        granularity = "position"
    elif component == "language" and not reads_norm_output(linear_name, layout):
        granularity = "channel_dynamic"
    else:
        granularity = "channel"
    return dataclasses.replace(spec, granularity=granularity)


def plan(targets, spec: ActivationQuant, layout_of=lambda component: None) -> dict[str, ActivationQuant]:
    """Each target Linear's concrete quantizer (targets: quantizers.targets.Target)."""
    return {t.name: resolve(spec, t.component, t.name, layout_of(t.component)) for t in targets}


# -- hooks --------------------------------------------------------------------------------------
class TokenMask:
    """The real-token mask (batch, sequence) of the language model's forward pass in flight, for
    quantizers that take ranges from the current input: padding must not widen a sequence's
    range. `watch(language_module)` holds the 2-D attention mask it receives while it runs (and
    nothing outside it: the vision tower's patches are not tokens of that sequence); the
    calibration walker, which runs blocks directly, sets it by hand."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

    def watch(self, module: nn.Module) -> list:
        return [module.register_forward_pre_hook(_HoldMask(self), with_kwargs=True),
                module.register_forward_hook(_ReleaseMask(self))]

    def rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """(batch, tokens) bool: which of x's tokens are real; None when the mask does not fit x.
        The current tokens are the mask's last columns (a decode step's mask covers the cache too)."""
        if self.mask is None or x.dim() != 3 or self.mask.shape[0] != x.shape[0] or self.mask.shape[1] < x.shape[1]:
            return None
        return self.mask[:, -x.shape[1]:].to(x.device) > 0


class _HoldMask(QuantizationHook):
    def __init__(self, tokens: TokenMask):
        self.tokens = tokens

    def __call__(self, module, args, kwargs):
        self.tokens.set(kwargs.get("attention_mask"))


class _ReleaseMask(_HoldMask):
    def __call__(self, module, args, output):
        self.tokens.set(None)


def _is_decode_step(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.shape[1] == 1


def _widened(lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor, spec: ActivationQuant) -> Range:
    """The range widened by a decode token's own extremes at the range's granularity."""
    if spec.granularity == "tensor":
        token_lo, token_hi = x.float().amin(dim=-1, keepdim=True), x.float().amax(dim=-1, keepdim=True)
    else:
        token_lo = token_hi = x.float()
    return torch.minimum(lo, token_lo), torch.maximum(hi, token_hi)


class ActivationQuantizer(QuantizationHook):
    """Forward pre-hook on a Linear: fake-quantize its input, dynamically or on a fixed range.
    `spec` is concrete (resolve() has replaced `official`)."""

    def __init__(self, bits: int, spec: ActivationQuant, value_range: Range | None = None,
                 tokens: TokenMask | None = None):
        if spec.granularity == "official":
            raise ValueError("resolve the official activation quantizer per Linear first")
        if spec.static and value_range is None:
            raise ValueError("a static activation quantizer needs a calibrated range")
        self.bits, self.spec, self.tokens = bits, spec, tokens
        self.range = value_range
        self._prefill_range: Range | None = None    # channel_dynamic: the last prefill's, per sequence

    def __call__(self, module, args):
        x = args[0]
        if self.spec.granularity == "token":
            return (quantize_dynamic(x, self.bits, self.spec.sym), *args[1:])
        lo, hi = self._range_for(x)
        if _is_decode_step(x) and self.spec.decode == "widen":
            lo, hi = _widened(lo, hi, x, self.spec)
        return (quantize_static(x, lo, hi, self.bits, self.spec.sym), *args[1:])

    def _range_for(self, x: torch.Tensor) -> Range:
        if self.spec.granularity != "channel_dynamic":
            lo, hi = (t.to(x.device) for t in self.range)
            if self.spec.granularity == "position":
                if x.shape[-2] != lo.shape[0]:
                    raise RuntimeError(f"per-position activation ranges were fitted for {lo.shape[0]} positions; "
                                       f"this input has {x.shape[-2]}")
                return lo.unsqueeze(-1), hi.unsqueeze(-1)
            return lo, hi
        if _is_decode_step(x) and self._prefill_range is not None \
                and self._prefill_range[0].shape[0] == x.shape[0]:
            return self._prefill_range
        real = self.tokens.rows(x) if self.tokens is not None else None
        values = x.float() if x.dim() == 3 else x.float().reshape(1, -1, x.shape[-1])
        if real is None:
            lo, hi = values.amin(dim=1, keepdim=True), values.amax(dim=1, keepdim=True)
        else:
            keep = real.unsqueeze(-1)
            lo = torch.where(keep, values, torch.inf).amin(dim=1, keepdim=True)
            hi = torch.where(keep, values, -torch.inf).amax(dim=1, keepdim=True)
        if x.dim() != 3:
            lo, hi = lo.reshape(-1), hi.reshape(-1)
        elif not _is_decode_step(x):
            self._prefill_range = (lo, hi)
        return lo, hi


def activation_quantizers(model: nn.Module) -> Iterator["ActivationQuantizer"]:
    """The activation quantizers attached to the model's Linears."""
    return (hook for module in model.modules() for hook in module._forward_pre_hooks.values()
            if isinstance(hook, ActivationQuantizer))


def needs_whole_prefill(model: nn.Module) -> bool:
    """Whether a quantizer on the model takes its range from a sequence's whole prefill
    (channel_dynamic): a prefill split in two (a shared image prefix, then each question) would
    give it other ranges, so such a model is generated unshared."""
    return any(hook.spec.granularity == "channel_dynamic" for hook in activation_quantizers(model))


def has_activation_quantizers(model: nn.Module) -> bool:
    """Whether any Linear of the model quantizes its inputs (a W-A config is applied)."""
    return any(True for _ in activation_quantizers(model))


def attach(modules: Mapping[str, nn.Module], bits: int, specs: Mapping[str, ActivationQuant],
           ranges: Mapping[str, Range] | None = None, tokens: TokenMask | None = None) -> list:
    """One quantizer per named Linear (specs: each one's concrete quantizer, from plan());
    returns the hook handles."""
    missing = [name for name in modules if specs[name].static and name not in (ranges or {})]
    if missing:
        raise ValueError(f"static activation quantization: no calibrated range for {', '.join(missing[:3])}")
    return [module.register_forward_pre_hook(ActivationQuantizer(bits, specs[name], (ranges or {}).get(name), tokens))
            for name, module in modules.items()]


def _real_rows(x: torch.Tensor, spec: ActivationQuant, tokens: TokenMask | None) -> torch.Tensor:
    """x without its padding tokens (as rows of channels), where a mask fits and the ranges are
    not per position (positions need x's shape)."""
    real = tokens.rows(x) if tokens is not None and spec.granularity != "position" else None
    return x if real is None else x.reshape(-1, x.shape[-1])[real.reshape(-1)]


@torch.no_grad()
def calibrate_ranges(model: nn.Module, modules: Mapping[str, nn.Module], batches: list[dict],
                     specs: Mapping[str, ActivationQuant], tokens: TokenMask | None = None) -> dict[str, Range]:
    """Run the calibration batches and return each static Linear's input range under its spec's
    clip, over the real tokens of the language model's sequences (`tokens` watches its mask)."""
    static = {name: module for name, module in modules.items() if specs[name].static}
    seen: dict[str, list[Range]] = {name: [] for name in static}
    handles = [module.register_forward_pre_hook(
        lambda m, args, name=name: seen[name].append(observed_range(_real_rows(args[0], specs[name], tokens),
                                                                     specs[name])))
        for name, module in static.items()]
    try:
        for batch in batches:
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    never = [name for name, ranges in seen.items() if not ranges]
    if never:
        raise RuntimeError(f"activation calibration: no input reached {', '.join(never[:3])}")
    return {name: combine_ranges(ranges, specs[name]) for name, ranges in seen.items()}


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
