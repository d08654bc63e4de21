"""RTN: round-to-nearest on a min-max grid per output channel or per group; no calibration."""
from __future__ import annotations

import torch

from quantizers.blockwise import BlockOutput
from quantizers.bpw import LayerRecord
from quantizers.config import QuantConfig
from quantizers.primitives import fake_quantize
from quantizers.targets import Target


@torch.no_grad()
def quantize_targets(targets: list[Target], config: QuantConfig) -> BlockOutput:
    out = BlockOutput()
    for target in targets:
        weight = target.module.weight
        result = fake_quantize(weight, target.bits, config.group_size, config.sym)
        weight.copy_(result.dequantized)
        out.quantized[target.name] = result
        out.layers.append(LayerRecord(target.name, target.component, target.bits, weight.numel(),
                                      result.scale.numel(), config.sym))
    return out
