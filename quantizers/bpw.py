"""Exact bits per weight: quantized weights at their bit width plus 16-bit scale (and zero, when
asymmetric) per group, every other parameter at 16 bits, over all parameters of the model."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

FP_BITS = 16


@dataclass(frozen=True)
class LayerRecord:
    name: str            # qualified Linear name
    component: str
    bits: int
    numel: int           # weight elements
    n_groups: int        # scale/zero pairs stored
    sym: bool
    extra_bits: int = 0  # e.g. an explicit AWQ input scale kept beside the layer

    @property
    def weight_bits(self) -> int:
        per_group = FP_BITS if self.sym else 2 * FP_BITS
        return self.bits * self.numel + self.n_groups * per_group + self.extra_bits


def bits_per_weight(model: nn.Module, records: list[LayerRecord], components: dict[str, str]) -> dict[str, float]:
    """{"model": bpw, <component>: bpw, ...}; components maps names to module prefixes."""
    quantized = {f"{r.name}.weight": r for r in records}
    totals: dict[str, list[int]] = {"model": [0, 0]}
    totals.update({c: [0, 0] for c in components})
    for name, param in model.named_parameters():  # named_parameters() skips tied duplicates
        record = quantized.get(name)
        bits = record.weight_bits if record else FP_BITS * param.numel()
        # A parameter belongs to the innermost component holding it (a merger carved out of the
        # vision tower counts for the connector only), so no parameter is counted twice.
        holders = [c for c, prefix in components.items() if name.startswith(prefix + ".")]
        owners = ["model"] + sorted(holders, key=lambda c: -len(components[c]))[:1]
        for owner in owners:
            totals[owner][0] += bits
            totals[owner][1] += param.numel()
    return {owner: bits / count for owner, (bits, count) in totals.items() if count}
