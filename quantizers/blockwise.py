"""GPTQ and AWQ over a model: the calibration walker feeds each block, these functions gather
the statistics each algorithm needs through forward hooks and call the tensor-level cores in
gptq.py and awq.py. Nothing here knows a model family: blocks, norms and folds are found by
the module names the supported families share (quantizers/folds.py)."""
from __future__ import annotations

import torch
from torch import nn

from quantizers import awq
from quantizers.bpw import LayerRecord
from quantizers.calibration import Block
from quantizers.config import QuantConfig
from quantizers.folds import norm_linear_pairs
from quantizers.gptq import HessianAccumulator, gptq_quantize_full
from quantizers.primitives import QuantizedTensor, fake_quantize
from quantizers.targets import Target

# Rows of calibration activations kept per Linear for AWQ's searches (a seeded subsample).
AWQ_MAX_ROWS = 4096
# Projections AWQ's clip search skips (the reference: errors there are amplified by softmax).
_NO_CLIP = ("q_proj", "k_proj", "query", "key")
# (producer, consumer) Linear pairs inside a block whose scale folds exactly.
_LINEAR_FOLDS = (("self_attn.v_proj", "self_attn.o_proj"), ("self_attn.v_proj", "self_attn.out_proj"),
                 ("mlp.up_proj", "mlp.down_proj"))


class BlockOutput:
    """What quantizing one block produced: per-layer records, the integer form of each weight
    (for the cache), and the non-target parameters a fold legitimately changed."""

    def __init__(self) -> None:
        self.layers: list[LayerRecord] = []
        self.quantized: dict[str, QuantizedTensor] = {}
        self.changed: set[str] = set()
        self.details: dict[str, dict] = {}


def _collect_inputs(targets: list[Target], feed, on_input) -> None:
    handles = [t.module.register_forward_hook(lambda m, args, out, t=t: on_input(t, args[0]))
               for t in targets]
    try:
        feed()
    finally:
        for handle in handles:
            handle.remove()


# -- GPTQ ---------------------------------------------------------------------------------------
def gptq_block(block: Block, feed, config: QuantConfig) -> BlockOutput:
    params = dict(config.params)
    hessians = {t.name: HessianAccumulator(t.module.in_features, t.module.weight.device) for t in block.targets}
    _collect_inputs(block.targets, feed, lambda t, x: hessians[t.name].add_batch(x))
    out = BlockOutput()
    for target in block.targets:
        weight = target.module.weight
        result = gptq_quantize_full(
            weight, hessians[target.name].hessian, bits=target.bits, group_size=config.group_size,
            sym=config.sym, act_order=bool(params.get("act_order", False)),
            static_groups=bool(params.get("static_groups", False)), damp=float(params.get("damp", 0.01)),
            block_size=int(params.get("block_size", 128)))
        with torch.no_grad():
            weight.copy_(result.dequantized)
        out.quantized[target.name] = QuantizedTensor(result.dequantized, result.codes, result.scale,
                                                     result.zero, result.group_index)
        out.layers.append(LayerRecord(target.name, target.component, target.bits, weight.numel(),
                                      result.scale.numel(), config.sym))
        out.details[target.name] = {"damp": result.damp_used, "retries": result.retries}
    return out


# -- AWQ ----------------------------------------------------------------------------------------
def _gather_rows(targets: list[Target], feed, seed: int) -> dict[str, torch.Tensor]:
    rows: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    _collect_inputs(targets, feed, lambda t, x: rows[t.name].append(x.detach().reshape(-1, x.shape[-1]).float()))
    generator = torch.Generator().manual_seed(seed)
    gathered = {}
    for name, parts in rows.items():
        x = torch.cat(parts)
        if x.shape[0] > AWQ_MAX_ROWS:
            x = x[torch.randperm(x.shape[0], generator=generator)[:AWQ_MAX_ROWS].to(x.device)]
        gathered[name] = x
    return gathered


def _scale_groups(block: Block) -> list[tuple[list[Target], object]]:
    """(Linears sharing an input, where their scale folds) for the block's targets: a norm, a
    producer Linear, or None (an explicit input scale, counted in bpw)."""
    by_module = {t.module: t for t in block.targets}
    by_name = {t.name[len(block.name) + 1:]: t for t in block.targets}
    groups, grouped = [], set()
    for fold in norm_linear_pairs(block.module):
        members = [by_module[m] for m in fold.linears if m in by_module]
        if members and len(members) == len(fold.linears):   # fold only when every fed Linear is ours
            groups.append((members, fold.norm))
            grouped.update(t.name for t in members)
    for producer, consumer in _LINEAR_FOLDS:
        if producer in by_name and consumer in by_name and consumer not in grouped:
            prev, nxt = by_name[producer], by_name[consumer]
            if prev.module.out_features == nxt.module.in_features:
                groups.append(([nxt], prev.module))
                grouped.add(nxt.name)
    groups += [([t], None) for t in block.targets if t.name not in grouped]
    return groups


def awq_block(block: Block, feed, config: QuantConfig, seed: int = 0) -> BlockOutput:
    params = dict(config.params)
    n_grid = int(params.get("n_grid", 20))
    group_size = config.group_size
    inputs = _gather_rows(block.targets, feed, seed)
    out = BlockOutput()
    names = {id(m): n for n, m in block.module.named_modules()}
    # 1) Search and apply every scale on the FP weights first; a producer Linear (v_proj,
    #    up_proj) must be rescaled before it is itself rounded.
    for members, fold_target in _scale_groups(block):
        x = inputs[members[0].name]
        linears = [t.module for t in members]
        s, alpha, _ = awq.search_scale(x, linears, bits=members[0].bits, group_size=group_size,
                                       sym=config.sym, n_grid=n_grid)
        if alpha == 0:   # s = 1: nothing to fold, and no explicit scale to pay 16 bits/channel for
            continue
        if fold_target is not None:
            fold = awq.fold_into_linear if isinstance(fold_target, nn.Linear) else awq.fold_into_norm
            fold(fold_target, linears, s)
            # The fold rescales the producer's parameters; a target's weight is rounded later,
            # anything else (norm gain and bias, a producer's bias) is declared as changed.
            out.changed.update(f"{block.name}.{names[id(fold_target)]}.{p}"
                               for p, _ in fold_target.named_parameters())
        else:
            awq.attach_input_scale(linears[0], s)
        for t in members:
            inputs[t.name] = x / s
            out.details[t.name] = {"alpha": alpha, "fold": "explicit" if fold_target is None else
                                   names.get(id(fold_target), "?")}
    # 2) Clip search on the scaled weights with the scaled inputs, then round.
    for target in block.targets:
        weight = target.module.weight
        with torch.no_grad():
            if params.get("clip", True) and not target.name.endswith(_NO_CLIP):
                max_val = awq.search_clip(inputs[target.name], weight, bits=target.bits,
                                          group_size=group_size, sym=config.sym, n_grid=n_grid)
                weight.copy_(awq.apply_clip(weight, max_val, group_size))
            result = fake_quantize(weight, target.bits, group_size, config.sym)
            weight.copy_(result.dequantized)
        out.quantized[target.name] = result
        out.layers.append(LayerRecord(target.name, target.component, target.bits, weight.numel(),
                                      result.scale.numel(), config.sym,
                                      extra_bits=awq.input_scale_bits(target.module)))
    return out

