"""QIG's pieces as tensor functions (quantization-aware integrated gradients, arXiv 2603.17809);
the per-window weighting that AWQ and GPTQ use over the calibration walker is
quantizers/weighting.py.

- Integrated gradients of a scalar f along the straight path from a baseline b to x:
  A = (x - b) * mean_k grad f(b + a_k (x - b)), a_k the midpoints of `steps` equal pieces of
  [0, 1]; sum(A) approaches f(x) - f(b) (completeness) as the steps grow.
- Token score: mean |A| over channels; normalized per sample over its real tokens,
  IQR-clipped to [Q1 - 1.5 IQR, Q3 + 1.5 IQR], renormalized. Our weights have mean 1 over a
  sample's real tokens (0 on padding), so uniform weights are all ones.
- Modality weights (MBQ-style): one weight per modality, each token its modality's mean.
"""
from __future__ import annotations

from typing import Callable

import torch

IQR_FACTOR = 1.5


def integrated_gradients(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, baseline: torch.Tensor,
                         steps: int = 32) -> torch.Tensor:
    """Attributions of f(x) - f(baseline) to each element of x (f returns a scalar)."""
    delta = (x - baseline).detach()
    total = torch.zeros_like(x, dtype=torch.float32)
    for k in range(steps):
        point = (baseline + (k + 0.5) / steps * delta).detach().requires_grad_(True)
        with torch.enable_grad():
            grad, = torch.autograd.grad(f(point), point)
        total += grad.float()
    return delta.float() * total / steps


def token_scores(attributions: torch.Tensor) -> torch.Tensor:
    """(batch, tokens): mean |attribution| over the channels."""
    return attributions.abs().mean(dim=-1)


def _mean_one(values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """values scaled to mean 1 over each row's real tokens, 0 elsewhere; a row with no signal
    (every score 0: its inputs equal the baseline) is uniform."""
    values = values * real
    count = real.sum(dim=1, keepdim=True).clamp_min(1)
    total = values.sum(dim=1, keepdim=True)
    return torch.where(total > 0, values * count / total.clamp_min(1e-30), real.float())


def token_weights(scores: torch.Tensor, real: torch.Tensor | None = None, iqr_clip: bool = True) -> torch.Tensor:
    """Per-sample weights from token scores: normalized, IQR-clipped over the real tokens
    (`real`: (batch, tokens) bool; None: every token), renormalized to mean 1."""
    scores = scores.float()
    real = torch.ones_like(scores, dtype=torch.bool) if real is None else real.bool()
    weights = _mean_one(scores, real)
    if not iqr_clip:
        return weights
    rows = []
    for row, keep in zip(weights, real):
        values = row[keep]
        q1, q3 = torch.quantile(values, 0.25), torch.quantile(values, 0.75)
        spread = q3 - q1
        clipped = row.clamp(q1 - IQR_FACTOR * spread, q3 + IQR_FACTOR * spread)
        rows.append(clipped)
    return _mean_one(torch.stack(rows), real)


def modality_weights(weights: torch.Tensor, vision: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """One weight per modality and sample: each real token gets the mean weight of its modality
    (vision tokens, the other tokens), renormalized to mean 1."""
    real = torch.ones_like(weights, dtype=torch.bool) if real is None else real.bool()
    vision = vision.bool() & real
    text = real & ~vision
    out = torch.zeros_like(weights, dtype=torch.float32)
    for mask in (vision, text):
        count = mask.sum(dim=1, keepdim=True)
        mean = (weights * mask).sum(dim=1, keepdim=True) / count.clamp_min(1)
        out = torch.where(mask, mean.expand_as(out), out)
    return _mean_one(out, real)
