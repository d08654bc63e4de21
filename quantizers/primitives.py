"""Fake-quant primitives shared by every method: min-max grids, rounding, dequantization.

Conventions follow the GPTQ reference (IST-DASLab/gptq, quant.py) so that RTN and GPTQ use one
grid: per row (output channel) or per group of columns, xmin = min(w.min, 0), xmax = max(w.max, 0);
asymmetric: scale = (xmax - xmin) / (2^bits - 1), zero = round(-xmin / scale); symmetric:
xmax = max(|xmin|, xmax), xmin = -xmax, zero = 2^(bits-1). q = clamp(round(w/scale) + zero,
0, 2^bits - 1); dequantized = scale * (q - zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedTensor:
    """A quantized weight in integer form: what every method produces and the cache stores.
    dequantize(codes, scale, zero, group_index) rebuilds `dequantized` bit for bit. Methods make
    codes one per byte; the host copy (to_host) and the cache keep codes below 16 packed two per
    byte (`packed`), which halves the bytes that cross to the host and to disk: read them through
    unpacked()."""
    codes: torch.Tensor         # uint8 integer codes, (rows, cols); packed: (rows, ceil(cols / 2)),
                                # two codes a byte along the columns, the even column in the low nibble
    scale: torch.Tensor         # (rows, n_groups) float32
    zero: torch.Tensor          # (rows, n_groups) float32 (integer valued)
    group_index: torch.Tensor   # (cols,) int64: column -> group (any mapping, e.g. act-order)
    dequantized: torch.Tensor | None = None   # the weight's dtype; None when read from the cache
    packed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's (rows, cols), packed or not."""
        return self.codes.shape[0], self.group_index.numel()

    def unpacked(self) -> "QuantizedTensor":
        """This weight with one code per byte (itself when not packed), where its codes are."""
        if not self.packed:
            return self
        return QuantizedTensor(unpack4(self.codes, self.shape[1]), self.scale, self.zero, self.group_index,
                               self.dequantized)

    def packed_if_it_fits(self) -> "QuantizedTensor":
        """This weight with its codes packed two a byte, where they are, if all are below 16
        (itself when packed already or when they are not): the one place that decides it."""
        if self.packed or not (self.codes.numel() == 0 or int(self.codes.max()) < 16):
            return self
        return QuantizedTensor(pack4(self.codes), self.scale, self.zero, self.group_index, None, True)

    def to_device(self, device) -> "QuantizedTensor":
        """The integer form on `device`, still packed if it was (unpack where the work is). To a
        GPU without waiting (stream order keeps it safe); to the host a waiting copy."""
        non_blocking = torch.device(device).type == "cuda"
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantizedTensor(move(self.codes), move(self.scale), move(self.zero), move(self.group_index),
                               None, self.packed)

    def to_host(self) -> "QuantizedTensor":
        """The integer form on the host, as the cache stores it: codes below 16 packed first,
        where they are (on a GPU: half the bytes to copy and to pin), then copied without waiting
        (host_copy: the caller synchronizes before reading it)."""
        w = self.packed_if_it_fits()
        return QuantizedTensor(host_copy(w.codes), host_copy(w.scale), host_copy(w.zero),
                               host_copy(w.group_index.long()), None, w.packed)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Codes below 16, two a byte along the columns, the even column in the low nibble (an odd
    width gets a zero column, dropped again by unpack4)."""
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    pairs = torch.stack([packed & 15, packed >> 4], dim=-1)
    return pairs.reshape(packed.shape[0], -1)[:, :cols].contiguous()


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of tensor that owns its memory; of a GPU tensor, straight into pinned memory
    without waiting: one copy at DMA speed, where .cpu() stages through pageable memory at a
    fraction of it (a 7B language model's codes are 3.3 GB packed, 6.5 GB not). The caller
    synchronizes before reading it."""
    host = torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda)
    return host.copy_(tensor, non_blocking=tensor.is_cuda)


class QuantizationHook:
    """Base of every forward pre-hook quantization leaves on a model (activation fake-quant, AWQ's
    explicit input scale). The runtime undoes a config by removing exactly these: the model's
    own hooks (transformers installs some lazily, at the first forward) stay."""


def group_width(in_features: int, group_size: int) -> int:
    """Columns per quantization group: -1, or a group as wide as the row or wider, is one group
    per output channel. The one place this rule lives (RTN, GPTQ, AWQ and the cache use it)."""
    return in_features if group_size == -1 or group_size >= in_features else group_size


def plain_group_index(in_features: int, group_size: int) -> torch.Tensor:
    """Column -> group for consecutive groups of group_size columns (-1: one group per row)."""
    return torch.arange(in_features) // group_width(in_features, group_size)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_index: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """scale * (codes - zero) in float32, then cast: the very arithmetic of quantize_with, so a
    model restored from integer codes is bit-identical to the one quantized in place."""
    gi = group_index.long().to(codes.device)
    return (scale[:, gi] * (codes.float() - zero[:, gi])).to(dtype)


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of a 2-D float tensor (the last dim is reduced)."""
    wmin, wmax = w.min(dim=-1, keepdim=True).values, w.max(dim=-1, keepdim=True).values
    return grid_params_from_range(wmin, wmax, bits, sym)


def grid_params_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int,
                           sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_params from each row's min and max, so that a row held in pieces needs no
    concatenation: min and max are exact, so the pieces' extremes give the same grid."""
    maxq = 2 ** bits - 1
    xmin = wmin.clamp(max=0)
    xmax = wmax.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    # An all-zero row would give scale 0; the reference widens it to [-1, 1].
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Round onto a given grid; returns (codes, dequantized)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)
    return q, scale * (q - zero)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int = -1, sym: bool = False) -> QuantizedTensor:
    """Round-to-nearest on a (out_features, in_features) weight, per row or per column group.
    A last group narrower than group_size (in_features not a multiple) is its own group."""
    rows, cols = weight.shape
    g = group_width(cols, group_size)
    n_groups = -(-cols // g)
    # Zero padding is exact here: every grid already contains 0 (xmin <= 0 <= xmax).
    w = torch.nn.functional.pad(weight.detach().float(), (0, n_groups * g - cols))
    groups = w.reshape(rows * n_groups, g)
    scale, zero = grid_params(groups, bits, sym)
    codes, deq = quantize_with(groups, scale, zero, bits)
    return QuantizedTensor(codes.reshape(rows, -1)[:, :cols].to(torch.uint8),
                           scale.reshape(rows, n_groups), zero.reshape(rows, n_groups),
                           plain_group_index(cols, group_size).to(weight.device),
                           deq.reshape(rows, -1)[:, :cols].to(weight.dtype))

