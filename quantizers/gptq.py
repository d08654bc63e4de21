"""GPTQ (Frantar et al., reference IST-DASLab/gptq) as pure functions over tensors.

Columns are quantized one at a time on the shared min-max grid (quantizers.primitives); each
column's rounding error, scaled by the inverse Hessian, is pushed onto the columns not yet
quantized, so the layer output X W^T moves as little as possible. Everything runs in float32.

Group boundaries (dynamic groups): scale/zero are computed from the group's CURRENT weights, i.e.
with every error update made so far, including those of the current block that the lazy batch
has not yet written to later columns. This makes the result independent of block_size. The
reference instead reads the group's weights as of the start of the current block; both agree
whenever a group starts at a block start (e.g. group_size a multiple of block_size).
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
