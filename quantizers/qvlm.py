"""Q-VLM's pieces as tensor functions (Wang et al., NeurIPS 2024, arXiv 2410.08119); the method
that strings them together over the calibration walker is quantizers/methods/qvlm.py.

- Soft assignment: each activation value x is spread over the quantization levels q_m of its
  layer's grid with p(m | x) = softmax_m(-(x - q_m)^2 / (temperature * step)), so entropies are
  differentiable and defined for continuous activations (the paper's proxy).
- Dependency between consecutive layers k and k+1: the conditional entropy H(Q_k+1 | Q_k) of
  their quantized activations, elements paired by position (the residual stream has one shape
  through a stack), H(Q_k+1 | Q_k) = H(Q_k, Q_k+1) - H(Q_k), with the joint distribution
  P(m, n) = mean over elements of p_k(m | x) p_k+1(n | y). A large value means layer k+1's
  quantized activations are far from determined by layer k's: its rounding errors propagate
  unpredictably, so the two are searched jointly.
- Partition: consecutive layers join one block while their dependency exceeds the threshold,
  up to max_depth layers per block.
- Clipping candidates: percentiles from 1.0 down to 0.98 in steps of 0.005.
"""
from __future__ import annotations

import torch


def quantization_levels(lo: float, hi: float, bits: int) -> tuple[torch.Tensor, float]:
    """The 2^bits equally spaced levels spanning [lo, hi], and their step."""
    count = 2 ** bits
    step = max((hi - lo) / (count - 1), 1e-12)
    return lo + step * torch.arange(count, dtype=torch.float32), step


def soft_assignment(x: torch.Tensor, levels: torch.Tensor, step: float, temperature: float = 1.0) -> torch.Tensor:
    """(elements, levels): each element's probability of each level."""
    distance = (x.reshape(-1, 1).float() - levels.to(x.device).reshape(1, -1)) ** 2
    return torch.softmax(-distance / (temperature * step), dim=-1)


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of a distribution, or of the marginal of per-element assignments."""
    marginal = probabilities.reshape(-1, probabilities.shape[-1]).mean(dim=0) if probabilities.dim() > 1 else probabilities
    marginal = marginal / marginal.sum()
    return -(marginal * torch.log(marginal.clamp_min(1e-12))).sum()


def conditional_entropy(given: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """H(then | given) from the per-element assignments of two layers, paired by element."""
    joint = given.T @ then / given.shape[0]            # (levels_k, levels_k+1)
    return entropy(joint.reshape(-1)) - entropy(given)


def layer_assignment(values: torch.Tensor, bits: int, temperature: float) -> torch.Tensor:
    """Soft assignment of one layer's sampled activations on its own min-max grid."""
    levels, step = quantization_levels(values.min().item(), values.max().item(), bits)
    return soft_assignment(values, levels, step, temperature)


def dependencies(layer_values: list[torch.Tensor], bits: int, temperature: float = 1.0) -> list[float]:
    """H(Q_k+1 | Q_k) for each pair of consecutive layers (len(layer_values) - 1 values)."""
    assignments = [layer_assignment(values, bits, temperature) for values in layer_values]
    return [conditional_entropy(a, b).item() for a, b in zip(assignments, assignments[1:])]


def partition(dependency: list[float], threshold: float | None = None, max_depth: int = 3) -> list[int]:
    """Block sizes over len(dependency) + 1 layers: layer k+1 joins layer k's block while
    dependency[k] exceeds the threshold (default: the mean) and the block is under max_depth."""
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    if threshold is None:
        threshold = sum(dependency) / len(dependency) if dependency else 0.0
    sizes = [1]
    for value in dependency:
        if value > threshold and sizes[-1] < max_depth:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def clip_candidates(p_max: float = 1.0, p_min: float = 0.98, p_step: float = 0.005) -> list[float]:
    """Percentiles from p_max down to p_min (both included) in steps of p_step."""
    count = int(round((p_max - p_min) / p_step)) + 1
    return [round(p_max - i * p_step, 6) for i in range(count)]


def sample_positions(numel: int, count: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` element positions in [0, numel), drawn with replacement from a seeded generator:
    the same for every tensor of the same size, so consecutive layers' samples pair element by
    element. With replacement, as a permutation of a full-size activation (40M elements) costs
    about a second on the host per call."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, numel, (count,), generator=generator).to(device)


def sample_elements(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The sampled elements of one layer's activations (all of them when there are few), on the host."""
    flat = x.detach().float().reshape(-1)
    if flat.numel() <= count:
        return flat.cpu()
    return flat[sample_positions(flat.numel(), count, seed, flat.device)].cpu()
