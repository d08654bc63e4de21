"""AWQ (activation-aware weight quantization), tensor-level core: scale search, clip search,
exact folds of the scale into the previous op, an explicit input scale where no fold exists,
and a driver for one group of Linears that share an input. The model walker lives elsewhere.

Follows mit-han-lab/llm-awq: s = mean|x|^alpha per input channel, alpha on a grid of 20,
normalized by sqrt(max s * min s); W*s is quantized and x/s feeds it, so salient input channels
get finer effective steps. Then a per-group clip search on the scaled weights. The grid is the
suite's shared one (quantizers.primitives: min-max including 0, GPTQ convention).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from quantizers.bpw import FP_BITS
from quantizers.primitives import QuantizationHook, fake_quantize, group_width

SCALE_BUFFER = "awq_input_scale"
_ROW_CHUNK = 4096          # calibration rows per matmul: bounds memory on long calibration sets
_CLIP_BUDGET = 2 ** 24     # elements of one (tokens, rows, groups) error tensor in the clip search
# Candidates are evaluated in batches: their weights are scaled or clipped, rounded and (clip
# search) their errors compared once per batch, as a few large kernels, instead of once per
# candidate. A batch holds at most _search_budget elements of candidate weights (candidates x
# rows x in). The matmuls stay one per candidate, with the shapes and the fresh (aligned)
# operands of the one-candidate loop: a BLAS picks its kernel by shape and alignment, and a
# candidate's sums would otherwise change in the last bits (seen with MKL: putting 7-row
# weights' candidates in one matmul moved the scale search's errors in the 7th digit).
_SEARCH_BUDGET_CUDA = 2 ** 26
# A CPU has no launches to save, and large batches cost it: they leave the caches, and glibc
# maps every block over 32 MiB afresh, page-faulting on each first touch. Measured (1024 x 1024
# weights, one thread): batches of 2^20 elements ran the scale search 1.8x faster than the
# one-candidate loop, 2^22 1.4x, 2^24 1.3x (its clip search 0.84x).
_SEARCH_BUDGET_CPU = 2 ** 20


def _search_budget(device: torch.device) -> int:
    return _SEARCH_BUDGET_CUDA if device.type == "cuda" else _SEARCH_BUDGET_CPU


def _candidate_scale(act_mean: Tensor, alpha: float) -> Tensor:
    # The clamp keeps dead channels (mean |x| = 0) from producing a zero or infinite scale;
    # the normalization centres s around 1 in log space so W*s stays in a sane range.
    s = act_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _scaled_rtn(weight: Tensor, scales: Tensor, bits: int, group_size: int,
                sym: bool) -> list[Tensor]:
    """The weight each scaled layer effectively applies to x, Q(W * s) / s, for every row s of
    `scales` (k, in): one fresh (out, in) tensor per candidate. The candidates are rounded in
    one stacked fake_quantize, which works row by row, so no bit changes."""
    k, (out, cols) = scales.shape[0], weight.shape
    scaled = (weight.unsqueeze(0) * scales.unsqueeze(1)).reshape(k * out, cols)
    deq = fake_quantize(scaled, bits, group_size, sym).dequantized.reshape(k, out, cols)
    return [deq[j] / scales[j] for j in range(k)]


def _candidate_errors(x: Tensor, weight: Tensor, scales: list[Tensor], *, bits: int,
                      group_size: int, sym: bool, row_weights: Tensor | None = None) -> list[float]:
    """mean((x Q(W*s)^T/s - x W^T)^2) for each candidate scale s; the bias cancels. As the
    one-candidate loop did it: per row chunk a float32 sum of squares, the chunks added as
    Python floats; x W^T is computed once, not once per candidate, and the host waits once.
    With row_weights (QIG's token weights), each row's squared error counts by its weight."""
    if row_weights is not None:
        return _weighted_candidate_errors(x, weight, scales, bits=bits, group_size=group_size, sym=sym,
                                          row_weights=row_weights)
    out, cols = weight.shape
    chunks = [x[start:start + _ROW_CHUNK] for start in range(0, x.shape[0], _ROW_CHUNK)]
    references = [chunk @ weight.T for chunk in chunks]
    per_batch = max(1, _search_budget(weight.device) // (out * cols))
    sums: list[Tensor] = []   # candidate-major, then chunk
    for first in range(0, len(scales), per_batch):
        for weight_q in _scaled_rtn(weight, torch.stack(scales[first:first + per_batch]), bits,
                                    group_size, sym):
            sums += [(chunk @ weight_q.T - reference).pow(2).sum()
                     for chunk, reference in zip(chunks, references)]
    values = torch.stack(sums).tolist() if sums else []
    errors = []
    for k in range(len(scales)):
        total = 0.0
        for value in values[k * len(chunks):(k + 1) * len(chunks)]:
            total += value
        errors.append(total / (x.shape[0] * out))
    return errors


def _weighted_candidate_errors(x: Tensor, weight: Tensor, scales: list[Tensor], *, bits: int, group_size: int,
                               sym: bool, row_weights: Tensor) -> list[float]:
    """sum_r w_r |x_r Q(W*s)^T/s - x_r W^T|^2 / (sum_r w_r * out) for each candidate scale s."""
    out = weight.shape[0]
    w = row_weights.to(x.device, torch.float32)
    reference = x @ weight.T
    per_batch = max(1, _search_budget(weight.device) // weight.numel())
    errors = []
    for first in range(0, len(scales), per_batch):
        for weight_q in _scaled_rtn(weight, torch.stack(scales[first:first + per_batch]), bits, group_size, sym):
            errors.append((((x @ weight_q.T - reference) ** 2).sum(dim=1) * w).sum())
    total = w.sum().clamp_min(1e-30) * out
    return [(e / total).item() for e in errors]


@torch.no_grad()
def search_scale(x: Tensor, linears: Sequence[nn.Linear], *, bits: int, group_size: int, sym: bool,
                 n_grid: int = 20, row_weights: Tensor | None = None) -> tuple[Tensor, float, float]:
    """Grid-search the per-input-channel AWQ scale for Linears sharing the input x (rows, in).

    Returns (scales, best_alpha, best_error). The error is the sum over the group's Linears of
    the mean squared output difference on x. Simplification vs llm-awq: the reference measures
    the output of the whole inspected module (e.g. self-attention, the MLP); we measure the
    group's own Linear outputs, which needs no module call and no attention inputs.
    alpha = 0 gives s = 1 exactly (plain RTN), and ties keep the smaller alpha, so the result
    is never worse than RTN on x. Candidates are evaluated in batches (_search_budget)."""
    x = x.reshape(-1, x.shape[-1]).float()
    weights = [linear.weight.detach().float() for linear in linears]
    act_mean = x.abs().mean(dim=0)
    alphas = [k / n_grid for k in range(n_grid)]
    scales = [_candidate_scale(act_mean, alpha) for alpha in alphas]
    errors = [0] * n_grid   # summed over the Linears in order, as sum() would
    for w in weights:
        per_candidate = _candidate_errors(x, w, scales, bits=bits, group_size=group_size, sym=sym,
                                          row_weights=row_weights)
        errors = [total + error for total, error in zip(errors, per_candidate)]
    best = (torch.ones_like(act_mean), 0.0, float("inf"))
    for s, alpha, error in zip(scales, alphas, errors):
        if error < best[2]:
            best = (s, alpha, error)
    return best


def _grouped(t: Tensor, g: int) -> Tensor:
    """(rows, cols) -> (rows, n_groups, g), zero padded; zeros add nothing to products or maxima."""
    pad = -t.shape[1] % g
    return nn.functional.pad(t, (0, pad)).reshape(t.shape[0], -1, g)


def _sample_rows(x: Tensor, n: int, seed: int) -> Tensor:
    if x.shape[0] <= n:
        return x
    generator = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=generator)[:n].sort().values.to(x.device)]


def _clip_chunk(xg: Tensor, w: Tensor, *, bits: int, g: int, sym: bool, n_grid: int,
                n_shrink: int) -> Tensor:
    """Best max |w| per (row, group) for a chunk of weight rows; xg is (tokens, n_groups, g).
    Candidate bounds are clipped and rounded in batches; each candidate's einsum then makes one
    (tokens, rows, groups) tensor, reduced before the next."""
    rows, cols = w.shape
    wg = _grouped(w, g)
    original_max = wg.abs().amax(dim=-1)
    reference = torch.einsum("ngk,rgk->nrg", xg, wg)
    per_batch = max(1, _search_budget(w.device) // (rows * cols))
    best_max = best_err = None
    for first in range(0, n_shrink, per_batch):
        k = min(per_batch, n_shrink - first)
        # i = 0 is "no clip", so the chosen bound never does worse than no clip on a group.
        max_vals = torch.stack([original_max * (1 - i / n_grid) for i in range(first, first + k)])
        clipped = apply_clip(w.repeat(k, 1), max_vals.reshape(k * rows, -1), g)
        deq = fake_quantize(clipped, bits, g, sym).dequantized
        # (k, rows, groups); _grouped copies, so each einsum gets a fresh operand, as before.
        errors = torch.stack([
            (torch.einsum("ngk,rgk->nrg", xg, _grouped(deq[j * rows:(j + 1) * rows], g))
             - reference).pow(2).mean(dim=0) for j in range(k)])
        # The first candidate with the least error, as a scan keeping strict improvements would;
        # a NaN error never improves, and when nothing is finite the scan keeps candidate 0.
        errors = torch.where(errors.isnan(), float("inf"), errors)
        pick = errors.argmin(dim=0, keepdim=True)
        batch_max, batch_err = max_vals.gather(0, pick)[0], errors.gather(0, pick)[0]
        if best_max is None:
            best_max, best_err = batch_max, batch_err
        else:
            better = batch_err < best_err
            best_max = torch.where(better, batch_max, best_max)
            best_err = torch.where(better, batch_err, best_err)
    return best_max


@torch.no_grad()
def search_clip(x: Tensor, weight: Tensor, *, bits: int, group_size: int, sym: bool, n_grid: int = 20,
                max_shrink: float = 0.5, n_sample_tokens: int = 512, seed: int = 0) -> Tensor:
    """Per output channel and group, the max |w| (rows, n_groups) that minimizes that group's
    output error x_g w_g^T on a seeded subsample of the rows of x. Candidates shrink the
    original max by (1 - i/n_grid), i = 0..int(max_shrink * n_grid) - 1; ties keep the smaller
    i. The reference takes every step-th token instead of a seeded random subset."""
    w = weight.detach().float()
    g = group_width(w.shape[1], group_size)
    xg = _grouped(_sample_rows(x.reshape(-1, x.shape[-1]).float(), n_sample_tokens, seed), g)
    n_shrink = max(1, int(max_shrink * n_grid))
    chunk = max(1, _CLIP_BUDGET // (xg.shape[0] * xg.shape[1]))
    return torch.cat([_clip_chunk(xg, w[start:start + chunk], bits=bits, g=g, sym=sym,
                                  n_grid=n_grid, n_shrink=n_shrink)
                      for start in range(0, w.shape[0], chunk)])


def apply_clip(weight: Tensor, max_val: Tensor, group_size: int) -> Tensor:
    """weight clamped to [-max_val, max_val] per (row, group); a new tensor in weight's dtype.
    Symmetric bounds also for asymmetric grids, as in the reference."""
    g = group_width(weight.shape[1], group_size)
    bound = max_val.repeat_interleave(g, dim=1)[:, :weight.shape[1]].to(weight.dtype)
    return torch.clamp(weight, -bound, bound)


@torch.no_grad()
def _scale_input_columns(linears: Sequence[nn.Linear], s: Tensor) -> None:
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype))


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: Sequence[nn.Linear], s: Tensor) -> None:
    """norm gain (and bias) /= s, the Linears' input columns *= s: exact, because the norm's
    output channel c reaches them only through column c. Valid for LayerNorm and for
    weight * normalized(x) RMSNorms (Llama); not for (1 + weight) variants (Gemma)."""
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    _scale_input_columns(linears, s)


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, linears: Sequence[nn.Linear], s: Tensor) -> None:
    """prev's output rows (and bias) /= s, the next Linears' input columns *= s. Exact only when
    prev's output reaches them through an op that is linear per channel: v_proj -> o_proj
    (attention mixes tokens, never channels) and up_proj -> down_proj (act(gate) * up)."""
    for linear in linears:
        if not (prev.out_features == linear.in_features == s.numel()):
            raise ValueError(f"cannot fold: prev has {prev.out_features} outputs, next Linear "
                             f"{linear.in_features} inputs, scale {s.numel()} channels")
    prev.weight.div_(s.to(prev.weight.dtype)[:, None])
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias.dtype))
    _scale_input_columns(linears, s)


class ExplicitInputScale(QuantizationHook):
    """Forward pre-hook dividing a Linear's input by its `awq_input_scale` buffer. Used where no
    exact fold exists (fc1 -> GELU -> fc2, post-LN blocks, a projector's first Linear). The
    scale is read at call time, so a buffer restored from a cache takes effect."""

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x / getattr(module, SCALE_BUFFER).to(x.dtype),) + tuple(args[1:])


@torch.no_grad()
def attach_input_scale(linear: nn.Linear, s: Tensor) -> RemovableHandle:
    """Weight columns *= s and a pre-hook dividing the input by s: the function is unchanged,
    the quantizer sees W * s. The buffer is persistent so a cache's state_dict carries it."""
    if hasattr(linear, SCALE_BUFFER):
        raise ValueError("this Linear already carries an AWQ input scale")
    linear.register_buffer(SCALE_BUFFER, s.detach().float().to(linear.weight.device).clone())
    _scale_input_columns([linear], s)
    return linear.register_forward_pre_hook(ExplicitInputScale())


def input_scale_bits(linear: nn.Module) -> int:
    """Storage of an explicit input scale: one 16-bit value per input channel (0 if none)."""
    scale = getattr(linear, SCALE_BUFFER, None)
    return 0 if scale is None else FP_BITS * scale.numel()
