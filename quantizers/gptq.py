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

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

# dequantize is re-exported: codes/scale/zero/group_index of a GPTQResult rebuild .dequantized
# bit for bit through it, since it runs the same float32 arithmetic as primitives.quantize_with,
# which the column sweep below spells out in place.
from quantizers.primitives import dequantize, grid_params, grid_params_from_range, group_width  # noqa: F401

MAX_RETRIES = 3
# gptq_quantize_stacked starts each weight on a multiple of 16 rows: 16 float32 values are
# 64 bytes, the alignment of a fresh CPU tensor, so each weight's matmul operands are aligned
# as they would be alone (some BLAS kernels, and so a result's last bit, depend on alignment).
STACK_ALIGN_ROWS = 16


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


def _group_grid(w, w_block, err_block, hinv, start, i, hi, segments, bits, sym):
    """Grid of the dynamic group whose columns are start+i .. hi, as they stand now: inside the
    block W1 is up to date; columns past the block still lack the lazy update from the block's
    errors so far, applied here (one matmul per weight's rows, see _quantize_columns). Each
    piece's row min/max is taken on its own: min and max are exact, so this equals the grid of
    the concatenated columns without building them."""
    end = start + w_block.shape[1]
    inside = w_block[:, i:min(hi, end) - start]
    if hi <= end:
        return grid_params(inside, bits, sym)
    wmin, wmax = inside.amin(dim=1, keepdim=True), inside.amax(dim=1, keepdim=True)
    for seg in segments:
        outside = w[seg, end:hi]
        if i > 0:   # with i = 0 the pending update is an exact zero
            outside = outside - err_block[seg, :i] @ hinv[start:start + i, end:hi]
        torch.minimum(wmin[seg], outside.amin(dim=1, keepdim=True), out=wmin[seg])
        torch.maximum(wmax[seg], outside.amax(dim=1, keepdim=True), out=wmax[seg])
    return grid_params_from_range(wmin, wmax, bits, sym)


def _sweep_block(w_block, hinv_block, column_scales, column_zeros, err_block, q_block, dq_block,
                 product, maxq, boundary=None):
    """The GPTQ sweep over the columns of one block, in place: w_block (rows, width) receives each
    column's error compensation, q/dq/err_block the codes, dequantized values and scaled errors.
    column_scales/zeros are (rows, 1) tensors, one per column. `boundary(i)` runs before column
    i (dynamic group grids, which read the block as it stands); when it is None, as on the CUDA
    graph path, the grids are all known before the block starts.

    Per column this issues ten in-place kernels on preallocated buffers, each the same IEEE
    operation, in the same order, as the plain formulation q = clamp(round(w / s) + z),
    dq = s (q - z), err = (w - dq) / d, W1 -= err h^T; so the result is bit for bit that of the
    earlier column-at-a-time code (frozen in tests/reference_quant.py). No fused
    multiply-add (addr_, addcmul_) is used: fusing would round once where the plain form rounds
    twice."""
    width = w_block.shape[1]
    w_col, err_col = w_block.split(1, dim=1), err_block.split(1, dim=1)
    q_col, dq_col = q_block.split(1, dim=1), dq_block.split(1, dim=1)
    # 0-d views: dividing by a device tensor, never by a host scalar (CUDA would multiply by its
    # reciprocal instead, which rounds differently).
    hinv_diag = torch.diagonal(hinv_block).unbind()
    for i in range(width):
        if boundary is not None:
            boundary(i)
        s, z = column_scales[i], column_zeros[i]
        q, dq, err = q_col[i], dq_col[i], err_col[i]
        torch.div(w_col[i], s, out=q).round_().add_(z).clamp_(0, maxq)
        torch.sub(q, z, out=dq).mul_(s)
        torch.sub(w_col[i], dq, out=err).div_(hinv_diag[i])
        if i + 1 < width:
            # Optimal compensation of this column's error by the block's remaining columns.
            update = torch.mul(err, hinv_block[i:i + 1, i + 1:], out=product[:, :width - i - 1])
            w_block[:, i + 1:].sub_(update)


class _BlockGraph:
    """_sweep_block captured once as a CUDA graph on static buffers, replayed for every full
    block of a sweep. The sweep is ~1,300 tiny kernels per 128-column block, so eager PyTorch is
    bound by launching them (0.37 s per 4096-column weight on an H200); a replay launches them
    all at once. The kernels are the very ones the eager path runs, on buffers of the same
    shapes and strides, so the results are bit for bit the same (benchmarks/perf/quant_cores.py
    checks it on a GPU)."""

    def __init__(self, rows: int, width: int, maxq: int, device: torch.device):
        def buffer(n_cols):
            return torch.zeros(rows, n_cols, dtype=torch.float32, device=device)
        self.w_block, self.scales, self.zeros = buffer(width), buffer(width), buffer(width)
        self.err_block, self.q_block, self.dq_block = buffer(width), buffer(width), buffer(width)
        self.product = buffer(width)
        self.hinv_block = torch.eye(width, dtype=torch.float32, device=device)
        self.args = (self.w_block, self.hinv_block, self.scales.split(1, dim=1), self.zeros.split(1, dim=1),
                     self.err_block, self.q_block, self.dq_block, self.product, maxq)
        # Off CUDA the same buffers are swept eagerly: the CPU tests check this path's
        # bookkeeping (copies in, grids gathered per column) against the plain sweep.
        self.graph = None
        if torch.device(device).type == "cuda":
            # Nothing to warm up: every kernel here is elementwise (no cuBLAS handle, no lazy
            # initialization); torch.cuda.graph provides the side stream capture needs.
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                _sweep_block(*self.args)

    def run(self, w_block, hinv_block, scale, zero, group_index):
        """One block: inputs copied in (exact copies), the graph replayed."""
        self.w_block.copy_(w_block)
        self.hinv_block.copy_(hinv_block)
        torch.index_select(scale, 1, group_index, out=self.scales)
        torch.index_select(zero, 1, group_index, out=self.zeros)
        if self.graph is not None:
            self.graph.replay()
        else:
            _sweep_block(*self.args)
        return self.err_block, self.q_block, self.dq_block


# Captured graphs, reused for every weight of their shape. A capture is not cheap:
# torch.cuda.graph synchronizes and empties the allocator's caches (what the quantizer allocates
# next is allocated from the driver again), then ~1,300 kernels are recorded and instantiated.
# The 7B perf grid captured 450 graphs, one per weight (68 s inside the capturing function under
# cProfile on an H100). A model's weights come in a few shapes (q/k/v stacked, o, gate/up stacked, down), so
# a handful serve a whole grid; reuse is exact, as for the blocks of one weight (every input is
# copied in and every output overwritten). Bounded: each holds eight (rows x width) float32 buffers.
_GRAPHS: OrderedDict[tuple, _BlockGraph] = OrderedDict()
MAX_GRAPHS = 8


def block_graph(rows: int, width: int, maxq: int, device: torch.device) -> _BlockGraph:
    """The block graph for this shape and grid, captured on first use."""
    key = (rows, width, maxq, str(device))
    if key in _GRAPHS:
        _GRAPHS.move_to_end(key)
    else:
        _GRAPHS[key] = _BlockGraph(rows, width, maxq, device)
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    return _GRAPHS[key]


def use_block_graphs(device: torch.device, dynamic: bool, group: int, block_size: int) -> bool:
    """Whether a sweep can replay one graph per block: on CUDA, when every group's grid is known
    at the start of a block (dynamic groups that begin mid-block read the block mid-sweep).
    VQB_GPTQ_GRAPHS=0 turns it off (the eager path, for comparison)."""
    if device.type != "cuda" or os.environ.get("VQB_GPTQ_GRAPHS", "1") == "0":
        return False
    return not dynamic or group % block_size == 0


def _quantize_columns(w, hinv, scale, zero, group_of_position, segments, *, bits, sym, group,
                      dynamic, block_size):
    """The GPTQ sweep over w (rows, cols, float32, processing order), which it overwrites.
    Returns (codes, dequantized) in processing order; fills scale/zero for dynamic groups.
    `segments` are the row slices of the weights stacked in w (one slice for a single weight).

    The elementwise work (_sweep_block) runs over all stacked rows at once; each matmul runs per
    segment, so every weight's matmuls have the shapes, strides and (segments start on 64-byte
    boundaries) alignment they would have alone. BLAS libraries choose kernels by all three, and
    a row's result can change in the last bit with them (seen with MKL on small matrices)."""
    rows, cols = w.shape
    maxq = 2 ** bits - 1
    codes = torch.empty_like(w)
    deq = torch.empty_like(w)
    scale_of, zero_of = scale.split(1, dim=1), zero.split(1, dim=1)   # (rows, 1) view per group
    product = torch.empty(rows, block_size, dtype=w.dtype, device=w.device)   # err h^T scratch
    graph = None
    if use_block_graphs(w.device, dynamic, group, block_size) and cols >= block_size:
        graph = block_graph(rows, block_size, maxq, w.device)
        group_of_column = torch.tensor(group_of_position, dtype=torch.long, device=w.device)

    def set_group_grid(start, i, w_block, err_block):
        """A dynamic group starting at column start+i gets its grid from the weights as they stand."""
        col = start + i
        if dynamic and col % group == 0:
            g = col // group
            scale[:, g:g + 1], zero[:, g:g + 1] = _group_grid(
                w, w_block, err_block, hinv, start, i, min(col + group, cols), segments, bits, sym)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        width = end - start
        w_block = w[:, start:end].clone()
        # Row-major copy: torch.linalg.cholesky(upper=True) returns a column-major factor, whose
        # rows (read once per column) would be strided. The matmuls keep reading hinv.
        hinv_block = hinv[start:end, start:end].contiguous()

        if graph is not None and width == block_size:
            # A graph sweep allows group boundaries at block starts only (use_block_graphs), where
            # no error of the block is pending yet.
            set_group_grid(start, 0, w_block, None)
            err_block, q_block, dq_block = graph.run(w_block, hinv_block, scale, zero,
                                                     group_of_column[start:end])
        else:
            err_block = torch.empty(rows, width, dtype=w.dtype, device=w.device)
            q_block = torch.empty_like(err_block)
            dq_block = torch.empty_like(err_block)
            columns = group_of_position[start:end]
            _sweep_block(w_block, hinv_block, [scale_of[g] for g in columns], [zero_of[g] for g in columns],
                         err_block, q_block, dq_block, product, maxq,
                         lambda i, start=start, w_block=w_block, err_block=err_block:
                         set_group_grid(start, i, w_block, err_block))
        codes[:, start:end] = q_block
        deq[:, start:end] = dq_block
        # Lazy batch update: the columns after the block receive all its errors in one matmul
        # (per stacked weight).
        for seg in segments:
            w[seg, end:] -= err_block[seg] @ hinv[start:end, end:]
    return codes, deq


def _gptq_float32(w, hessian, segments, *, bits, group_size, sym, act_order, static_groups, damp,
                  block_size):
    """GPTQ on a private float32 copy w (rows, cols), which it overwrites; `segments` as in
    _quantize_columns. Returns (dequantized float32, codes float32, scale, zero, group_index,
    damp_used, retries), original column order."""
    rows, cols = w.shape
    h = hessian.detach().to(w.device, torch.float32).clone()
    # One group spanning every column is per-channel quantization, as in primitives.fake_quantize.
    group = group_width(cols, group_size)
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
    codes, deq = _quantize_columns(w, hinv, scale, zero, group_of_position, segments, bits=bits,
                                   sym=sym, group=group, dynamic=grouped and not static_groups,
                                   block_size=block_size)
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, deq = codes[:, inverse], deq[:, inverse]
    return deq, codes, scale, zero, group_index, float(damp_used), retries


@torch.no_grad()
def gptq_quantize_full(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int,
                       group_size: int = -1, sym: bool = False, act_order: bool = False,
                       static_groups: bool = False, damp: float = 0.01,
                       block_size: int = 128) -> GPTQResult:
    _validate(weight, hessian, bits, group_size, block_size)
    deq, codes, scale, zero, group_index, damp_used, retries = _gptq_float32(
        weight.detach().to(torch.float32).clone(), hessian, [slice(None)], bits=bits,
        group_size=group_size, sym=sym, act_order=act_order, static_groups=static_groups, damp=damp,
        block_size=block_size)
    return GPTQResult(deq.to(weight.dtype), codes.to(torch.uint8), scale, zero, group_index,
                      damp_used, retries)


@torch.no_grad()
def gptq_quantize_stacked(weights: list[torch.Tensor], hessian: torch.Tensor, *, bits: int,
                          group_size: int = -1, sym: bool = False, act_order: bool = False,
                          static_groups: bool = False, damp: float = 0.01,
                          block_size: int = 128) -> list[GPTQResult]:
    """GPTQ of several weights that read the same input (q/k/v, gate/up) in one sweep: GPTQ
    treats rows independently given the Hessian, so their rows are stacked and the per-column
    work and the factorization are paid once. Returns what gptq_quantize_full returns for each
    weight alone, bit for bit (see _quantize_columns for why); group_index, damp_used and
    retries are the same for all."""
    if not weights:
        return []
    for weight in weights:
        _validate(weight, hessian, bits, group_size, block_size)
    starts, total = [], 0
    for weight in weights:
        starts.append(total)
        total += -(-weight.shape[0] // STACK_ALIGN_ROWS) * STACK_ALIGN_ROWS
    segments = [slice(first, first + weight.shape[0]) for first, weight in zip(starts, weights)]
    # Padding rows are zeros: they quantize to zero with zero error and are never returned.
    stacked = torch.zeros(total, weights[0].shape[1], dtype=torch.float32, device=weights[0].device)
    for rows, weight in zip(segments, weights):
        stacked[rows] = weight.detach()
    deq, codes, scale, zero, group_index, damp_used, retries = _gptq_float32(
        stacked, hessian, segments, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
        static_groups=static_groups, damp=damp, block_size=block_size)
    return [GPTQResult(deq[rows].to(weight.dtype, copy=True), codes[rows].to(torch.uint8),
                       scale[rows].clone(), zero[rows].clone(), group_index.clone(), damp_used,
                       retries)
            for rows, weight in zip(segments, weights)]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int = -1,
                  sym: bool = False, act_order: bool = False, static_groups: bool = False,
                  damp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """GPTQ fake quantization: the dequantized weight, same shape and dtype as `weight`."""
    return gptq_quantize_full(weight, hessian, bits=bits, group_size=group_size, sym=sym,
                              act_order=act_order, static_groups=static_groups, damp=damp,
                              block_size=block_size).dequantized
