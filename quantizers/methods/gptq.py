"""GPTQ as a method: gathers one Hessian per distinct Linear input of each block (q/k/v share
one) through the calibration walker, then runs the tensor-level core (quantizers/gptq.py) on
each targeted weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantizers.gptq import HessianAccumulator, gptq_quantize_full, gptq_quantize_stacked
from quantizers.methods import Method, QuantOutput, register_method
from quantizers.primitives import QuantizedTensor, fake_quantize
from quantizers.walker import Feed, Window, walk
from quantizers.weighting import TokenWeighting, WeightedParams, weighted


@dataclass(frozen=True)
class GPTQParams(WeightedParams):
    act_order: bool = False       # columns in decreasing Hessian diagonal order
    static_groups: bool = False   # with act_order: group parameters from the original column order
    damp: float = 0.01            # relative to mean(diag H); raised 10x on a failed Cholesky
    block_size: int = 128         # columns per lazy batch update (does not change the result)

    def validate(self, where: str) -> None:
        super().validate(where)   # the token weighting's
        self._require(where, "damp", self.damp >= 0, ">= 0 (a fraction of mean(diag H))")
        self._require(where, "block_size", self.block_size >= 1, ">= 1")


@register_method
class GPTQ(Method):
    name = "gptq"
    Params = GPTQParams
    calibrates = True

    def quantize(self, adapter, targets, config, batches, progress=False) -> QuantOutput:
        weighting = TokenWeighting(adapter, targets, batches, config)
        results = walk(adapter, targets, batches,
                       lambda window, feed: self.quantize_window(window, feed, config, weighting), progress)
        out = QuantOutput.merge(results)
        if weighting.details:
            out.details["weighting"] = weighting.details
        return out

    def quantize_window(self, window: Window, feed: Feed, config, weighting: TokenWeighting | None = None) -> QuantOutput:
        """One window; with a weighting, the Hessian is X^T diag(lambda) X over its token weights."""
        params: GPTQParams = config.params
        if weighting is not None:
            feed = weighted(feed, weighting.weights_for(window, feed))
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
            if target.name not in results:
                # No calibration row reached it (a MoE expert no calibration token was routed
                # to): GPTQ would zero its weight, having no statistics; round to nearest instead.
                _round_unreached(target, config, out)
                continue
            result = results[target.name]
            with torch.no_grad():
                target.module.weight.copy_(result.dequantized)
            out.add(target.name, target.component, target.bits,
                    QuantizedTensor(result.codes, result.scale, result.zero, result.group_index, result.dequantized),
                    config.sym)
            out.details[target.name] = {"damp": result.damp_used, "retries": result.retries}
        return out


NO_INPUT = "rtn: no calibration input reached it (a MoE expert no calibration token was routed to)"


@torch.no_grad()
def _round_unreached(target, config, out: QuantOutput) -> None:
    """Round-to-nearest for a target that saw no calibration input, recorded in its details."""
    result = fake_quantize(target.module.weight, target.bits, config.group_size, config.sym)
    target.module.weight.copy_(result.dequantized)
    out.add(target.name, target.component, target.bits, result, config.sym)
    out.details[target.name] = {"fallback": NO_INPUT}
