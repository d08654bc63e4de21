"""GPTQ as a method: gathers one Hessian per distinct Linear input of each block (q/k/v share
one) through the calibration walker, then runs the tensor-level core (quantizers/gptq.py) on
each targeted weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantizers.config import MethodParams
from quantizers.gptq import HessianAccumulator, gptq_quantize_full, gptq_quantize_stacked
from quantizers.methods import Method, QuantOutput, register_method
from quantizers.primitives import QuantizedTensor
from quantizers.walker import Feed, Window, walk


@dataclass(frozen=True)
class GPTQParams(MethodParams):
    act_order: bool = False       # columns in decreasing Hessian diagonal order
    static_groups: bool = False   # with act_order: group parameters from the original column order
    damp: float = 0.01            # relative to mean(diag H); raised 10x on a failed Cholesky
    block_size: int = 128         # columns per lazy batch update (does not change the result)

    def validate(self, where: str) -> None:
        self._require(where, "damp", self.damp >= 0, ">= 0 (a fraction of mean(diag H))")
        self._require(where, "block_size", self.block_size >= 1, ">= 1")


@register_method
class GPTQ(Method):
    name = "gptq"
    Params = GPTQParams
    calibrates = True

    def quantize(self, adapter, targets, config, batches, progress=False) -> QuantOutput:
        results = walk(adapter, targets, batches, lambda window, feed: self.quantize_window(window, feed, config),
                       progress)
        return QuantOutput.merge(results)

    def quantize_window(self, window: Window, feed: Feed, config) -> QuantOutput:
        params: GPTQParams = config.params
        groups: dict[str, tuple[list, HessianAccumulator]] = {}

        def accumulate(group, x, token_weights):
            key = group[0].name
            if key not in groups:
                groups[key] = (group, HessianAccumulator(group[0].module.in_features, group[0].module.weight.device))
            groups[key][1].add_batch(x, token_weights)

        feed.gather(window.targets, accumulate)
        options = dict(group_size=config.group_size, sym=config.sym,
                       act_order=params.act_order, static_groups=params.static_groups, damp=params.damp,
                       block_size=params.block_size)
        results = {}
        for group, hessian in groups.values():
            # Linears reading one input share its Hessian, and GPTQ treats rows independently:
            # one pass over their stacked rows gives each the result it would get alone.
            weights = [t.module.weight for t in group]
            bits = group[0].bits
            outputs = (gptq_quantize_stacked(weights, hessian.hessian, bits=bits, **options) if len(group) > 1
                       else [gptq_quantize_full(weights[0], hessian.hessian, bits=bits, **options)])
            results.update({t.name: result for t, result in zip(group, outputs)})
        out = QuantOutput()
        for target in window.targets:
            result = results[target.name]
            with torch.no_grad():
                target.module.weight.copy_(result.dequantized)
            out.add(target.name, target.component, target.bits,
                    QuantizedTensor(result.codes, result.scale, result.zero, result.group_index, result.dequantized),
                    config.sym)
            out.details[target.name] = {"damp": result.damp_used, "retries": result.retries}
        return out
