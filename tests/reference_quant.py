"""Test data, kept for parity and timing: the GPTQ and AWQ tensor cores exactly as they were
at commit 40de34e, before the fast-quant rewrite (issue 10). tests/test_gptq.py checks that the
current GPTQ gives the same bits, and benchmarks/perf/quant_cores.py times the current cores
against these. Frozen: do not edit or "fix" it; it is only correct as a copy of the old code.

Contents: quantizers/gptq.py at 40de34e (from its imports on, unchanged), then the search part of
quantizers/awq.py at 40de34e (_group_width .. apply_clip, unchanged). The shared primitives
(grid_params, quantize_with, fake_quantize) are imported from quantizers.primitives, whose
behaviour the rewrite keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# dequantize is re-exported: codes/scale/zero/group_index of a GPTQResult rebuild .dequantized
# bit for bit through it, since it runs the same float32 arithmetic as quantize_with.
from quantizers.primitives import dequantize, grid_params, quantize_with  # noqa: F401

MAX_RETRIES = 3


@dataclass
class GPTQResult:
    dequantized: torch.Tensor   # same shape and dtype as the weight
    codes: torch.Tensor         # uint8, original column order
    scale: torch.Tensor         # (rows, n_groups) float32
    zero: torch.Tensor          # (rows, n_groups) float32 (integer valued)
    group_index: torch.Tensor   # (cols,) long: the group each original column was quantized in
    damp_used: float            # relative damping that made the Hessian factorizable
    retries: int                # how many times damping had to be raised


class HessianAccumulator:
    """Running H = (2/N) sum_r lambda_r x_r x_r^T over every input row seen (lambda_r = 1 unless
    per-row weights are given: QIG's token-weighted Hessian X^T diag(lambda) X)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows_seen = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(self._h.device, torch.float32)
        m = rows.shape[0]
        if m == 0:
            return
        total = self.rows_seen + m
        if weights is not None:
            weights = weights.detach().reshape(-1).to(self._h.device, torch.float32)
            if weights.shape[0] != m or (weights < 0).any():
                raise ValueError(f"weights must be {m} non-negative values, one per input row")
            rows = rows * weights.sqrt().unsqueeze(1)
        # Rescale the old average instead of summing raw outer products: H stays O(|x|^2)
        # however many rows arrive, and the 2/N factor is folded into the new rows up front.
        self._h *= self.rows_seen / total
        rows = rows * (2.0 / total) ** 0.5
        self._h += rows.T @ rows
        self.rows_seen = total

    @property
    def hessian(self) -> torch.Tensor:
        return self._h


def upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    """Damp H by damp * mean(diag H), return (upper Cholesky factor of H^-1, damp used, retries).
    A Hessian that is not positive definite gets 10x the damping, at most MAX_RETRIES times."""
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for retries in range(MAX_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if info.item() == 0:
            hinv_upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return hinv_upper, damp, retries
        # Multiplying zero damping by 10 would never help, so start from the reference default.
        damp = damp * 10 if damp > 0 else 0.01
    raise ValueError(f"GPTQ: Hessian is not positive definite even with damping raised "
                     f"{MAX_RETRIES} times (mean diag {mean_diag.item():.3g})")


def _group_index(cols: int, group: int, perm: torch.Tensor | None, static: bool,
                 device: torch.device) -> torch.Tensor:
    """Group of each original column. Dynamic groups are consecutive runs of the processing
    order, so with act_order they are scattered back through the permutation."""
    by_position = torch.arange(cols, device=device) // group
    if perm is None or static:
        return by_position
    index = torch.empty_like(by_position)
    index[perm] = by_position
    return index


def _current_columns(w, w_block, err_block, hinv, start, i, hi):
    """Columns start+i .. hi as they stand now: inside the block W1 is up to date; columns past
    the block still lack the lazy update from the block's errors so far, applied here."""
    end = start + w_block.shape[1]
    inside = w_block[:, i:min(hi, end) - start]
    if hi <= end:
        return inside
    pending = err_block[:, :i] @ hinv[start:start + i, end:hi]
    return torch.cat([inside, w[:, end:hi] - pending], dim=1)


def _validate(weight, hessian, bits, group_size, block_size):
    if weight.dim() != 2:
        raise ValueError(f"GPTQ: weight must be 2-D, got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"GPTQ: hessian must be ({cols}, {cols}), got {tuple(hessian.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"GPTQ: bits must be in 2..8, got {bits}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"GPTQ: group_size must be -1 or positive, got {group_size}")
    if block_size < 1:
        raise ValueError(f"GPTQ: block_size must be positive, got {block_size}")


@torch.no_grad()
def gptq_quantize_full(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int,
                       group_size: int = -1, sym: bool = False, act_order: bool = False,
                       static_groups: bool = False, damp: float = 0.01,
                       block_size: int = 128) -> GPTQResult:
    _validate(weight, hessian, bits, group_size, block_size)
    rows, cols = weight.shape
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(w.device, torch.float32).clone()
    # One group spanning every column is per-channel quantization, as in primitives.fake_quantize.
    group = cols if group_size == -1 or group_size >= cols else group_size
    grouped = group < cols
    n_groups = -(-cols // group)
    scale = torch.zeros(rows, n_groups, device=w.device)
    zero = torch.zeros(rows, n_groups, device=w.device)
    if not grouped:
        # The reference takes per-channel params before zeroing dead columns; so do we.
        scale[:, :1], zero[:, :1] = grid_params(w, bits, sym)

    # Inputs that never fire carry no information: a unit diagonal keeps H invertible and
    # zeroing the weight makes the column's (unobservable) output exactly zero.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    if grouped and static_groups:
        for g in range(n_groups):  # from the original columns (after dead zeroing, as reference)
            scale[:, g:g + 1], zero[:, g:g + 1] = grid_params(w[:, g * group:(g + 1) * group], bits, sym)

    perm = None
    if act_order:
        # Largest-curvature columns first, while many columns remain to absorb their error.
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    group_index = _group_index(cols, group, perm, static_groups, w.device) if grouped \
        else torch.zeros(cols, dtype=torch.long, device=w.device)
    # A Python list: reading a CUDA tensor once per column would synchronize every time.
    group_of_position = (group_index[perm] if perm is not None else group_index).tolist()

    hinv, damp_used, retries = upper_cholesky_of_inverse(h, damp)
    codes = torch.zeros_like(w)
    deq = torch.zeros_like(w)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if grouped and not static_groups and col % group == 0:
                current = _current_columns(w, w_block, err_block, hinv, start, i, min(col + group, cols))
                g = col // group
                scale[:, g:g + 1], zero[:, g:g + 1] = grid_params(current, bits, sym)
            g = group_of_position[col]
            q, dq = quantize_with(w_block[:, i:i + 1], scale[:, g:g + 1], zero[:, g:g + 1], bits)
            codes[:, col], deq[:, col] = q[:, 0], dq[:, 0]
            err = (w_block[:, i] - dq[:, 0]) / hinv_block[i, i]
            # Optimal compensation of this column's error by the block's remaining columns.
            w_block[:, i + 1:] -= torch.outer(err, hinv_block[i, i + 1:])
            err_block[:, i] = err
        # Lazy batch update: the columns after the block receive all its errors in one matmul.
        w[:, end:] -= err_block @ hinv[start:end, end:]

    if perm is not None:
        inverse = torch.argsort(perm)
        codes, deq = codes[:, inverse], deq[:, inverse]
    return GPTQResult(deq.to(weight.dtype), codes.to(torch.uint8), scale, zero, group_index,
                      float(damp_used), retries)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int = -1,
                  sym: bool = False, act_order: bool = False, static_groups: bool = False,
                  damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """GPTQ fake quantization: the dequantized weight, same shape and dtype as `weight`."""
    return gptq_quantize_full(weight, hessian, bits=bits, group_size=group_size, sym=sym,
                              act_order=act_order, static_groups=static_groups, damp=damp,
                              block_size=block_size).dequantized


# -- AWQ search, from quantizers/awq.py at 40de34e -------------------------------------------
from collections.abc import Sequence  # noqa: E402

from torch import Tensor, nn  # noqa: E402

from quantizers.primitives import fake_quantize  # noqa: E402

_ROW_CHUNK = 4096          # calibration rows per matmul: bounds memory on long calibration sets
_CLIP_BUDGET = 2 ** 24     # elements of one (tokens, rows, groups) error tensor in the clip search


def _group_width(cols: int, group_size: int) -> int:
    """Same rule as fake_quantize: -1 or a group wider than the row means per channel."""
    return cols if group_size == -1 or group_size >= cols else group_size


def _output_mse(x: Tensor, weight: Tensor, weight_q: Tensor, x_q: Tensor | None = None) -> float:
    """mean((x_q W_q^T) - (x W^T))^2; the bias cancels in the difference so it is left out.
    x_q defaults to x; it differs when the quantized weight reads a scaled input x/s."""
    x_q = x if x_q is None else x_q
    total = 0.0
    for start in range(0, x.shape[0], _ROW_CHUNK):
        rows = slice(start, start + _ROW_CHUNK)
        diff = x_q[rows] @ weight_q.T - x[rows] @ weight.T
        total += diff.pow(2).sum().item()
    return total / (x.shape[0] * weight.shape[0])


def _candidate_scale(act_mean: Tensor, alpha: float) -> Tensor:
    # The clamp keeps dead channels (mean |x| = 0) from producing a zero or infinite scale;
    # the normalization centres s around 1 in log space so W*s stays in a sane range.
    s = act_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _scaled_rtn(weight: Tensor, s: Tensor, bits: int, group_size: int, sym: bool) -> Tensor:
    """The weight the scaled layer effectively applies to x: Q(W * s) / s."""
    return fake_quantize(weight * s, bits, group_size, sym).dequantized / s


@torch.no_grad()
def search_scale(x: Tensor, linears: Sequence[nn.Linear], *, bits: int, group_size: int, sym: bool,
                 n_grid: int = 20) -> tuple[Tensor, float, float]:
    """Grid-search the per-input-channel AWQ scale for Linears sharing the input x (rows, in).

    Returns (scales, best_alpha, best_error). The error is the sum over the group's Linears of
    the mean squared output difference on x. Simplification vs llm-awq: the reference measures
    the output of the whole inspected module (e.g. self-attention, the MLP); we measure the
    group's own Linear outputs, which needs no module call and no attention inputs.
    alpha = 0 gives s = 1 exactly (plain RTN), and ties keep the smaller alpha, so the result
    is never worse than RTN on x."""
    x = x.reshape(-1, x.shape[-1]).float()
    weights = [linear.weight.detach().float() for linear in linears]
    act_mean = x.abs().mean(dim=0)
    best = (torch.ones_like(act_mean), 0.0, float("inf"))
    for k in range(n_grid):
        alpha = k / n_grid
        s = _candidate_scale(act_mean, alpha)
        error = sum(_output_mse(x, w, _scaled_rtn(w, s, bits, group_size, sym)) for w in weights)
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
    """Best max |w| per (row, group) for a chunk of weight rows; xg is (tokens, n_groups, g)."""
    wg = _grouped(w, g)
    original_max = wg.abs().amax(dim=-1)
    reference = torch.einsum("ngk,rgk->nrg", xg, wg)
    best_max, best_err = original_max.clone(), torch.full_like(original_max, float("inf"))
    for i in range(n_shrink):
        # i = 0 is "no clip", so the chosen bound never does worse than no clip on a group.
        max_val = original_max * (1 - i / n_grid)
        clipped = apply_clip(w, max_val, g)
        wq = _grouped(fake_quantize(clipped, bits, g, sym).dequantized, g)
        err = (torch.einsum("ngk,rgk->nrg", xg, wq) - reference).pow(2).mean(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


@torch.no_grad()
def search_clip(x: Tensor, weight: Tensor, *, bits: int, group_size: int, sym: bool, n_grid: int = 20,
                max_shrink: float = 0.5, n_sample_tokens: int = 512, seed: int = 0) -> Tensor:
    """Per output channel and group, the max |w| (rows, n_groups) that minimizes that group's
    output error x_g w_g^T on a seeded subsample of the rows of x. Candidates shrink the
    original max by (1 - i/n_grid), i = 0..int(max_shrink * n_grid) - 1. The reference takes
    every step-th token instead of a seeded random subset."""
    w = weight.detach().float()
    g = _group_width(w.shape[1], group_size)
    xg = _grouped(_sample_rows(x.reshape(-1, x.shape[-1]).float(), n_sample_tokens, seed), g)
    n_shrink = max(1, int(max_shrink * n_grid))
    chunk = max(1, _CLIP_BUDGET // (xg.shape[0] * xg.shape[1]))
    return torch.cat([_clip_chunk(xg, w[start:start + chunk], bits=bits, g=g, sym=sym,
                                  n_grid=n_grid, n_shrink=n_shrink)
                      for start in range(0, w.shape[0], chunk)])


def apply_clip(weight: Tensor, max_val: Tensor, group_size: int) -> Tensor:
    """weight clamped to [-max_val, max_val] per (row, group); a new tensor in weight's dtype.
    Symmetric bounds also for asymmetric grids, as in the reference."""
    g = _group_width(weight.shape[1], group_size)
    bound = max_val.repeat_interleave(g, dim=1)[:, :weight.shape[1]].to(weight.dtype)
    return torch.clamp(weight, -bound, bound)

