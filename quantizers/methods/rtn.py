"""RTN: round-to-nearest on a min-max grid per output channel or per group; no calibration."""
from __future__ import annotations

import torch

from quantizers.methods import Method, QuantOutput, register_method
from quantizers.primitives import fake_quantize


@register_method
class RTN(Method):
    name = "rtn"
    cached = False   # deterministic and fast: recomputed rather than stored
    relative_cost = 0.02

    def quantize(self, adapter, targets, config, batches=None, progress=False) -> QuantOutput:
        return _round(targets, config)

    def quantize_window(self, window, feed, config, weighting=None) -> QuantOutput:
        """Round the window's targets; its calibration inputs are not needed."""
        return _round(window.targets, config)


@torch.no_grad()
def _round(targets, config) -> QuantOutput:
    out = QuantOutput()
    for target in targets:
        weight = target.module.weight
        result = fake_quantize(weight, target.bits, config.group_size, config.sym)
        weight.copy_(result.dequantized)
        out.add(target.name, target.component, target.bits, result, config.sym)
    return out
