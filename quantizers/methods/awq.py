"""AWQ as a method: per block, the calibration inputs of each group of Linears that share an
input, a scale search folded into the op that produces that input (a norm or a Linear, from
the adapter's block layout; an explicit input scale where none exists), then a clip search and
rounding per Linear. The tensor-level searches and folds are in quantizers/awq.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantizers import awq
from quantizers.folds import norm_linear_pairs
from quantizers.methods import Method, QuantOutput, register_method
from quantizers.methods.gptq import NO_INPUT
from quantizers.primitives import fake_quantize
from quantizers.targets import Target
from quantizers.walker import Block, Feed, Window, walk
from quantizers.weighting import TokenWeighting, WeightedParams, weighted

# Rows of calibration activations kept per Linear for AWQ's searches (a seeded subsample).
AWQ_MAX_ROWS = 4096


@dataclass(frozen=True)
class AWQParams(WeightedParams):
    n_grid: int = 20      # candidates of the scale exponent alpha and of the clip ratio
    clip: bool = True     # the clip search after scaling
    seed: int = 0         # the row subsample

    def validate(self, where: str) -> None:
        super().validate(where)   # the token weighting's
        self._require(where, "n_grid", self.n_grid >= 1, ">= 1")
        self._require(where, "seed", self.seed >= 0, ">= 0")


@register_method
class AWQ(Method):
    name = "awq"
    Params = AWQParams
    calibrates = True
    relative_cost = 0.45

    def quantize(self, adapter, targets, config, batches, progress=False) -> QuantOutput:
        weighting = TokenWeighting(adapter, targets, batches, config)
        out = QuantOutput.merge(walk(adapter, targets, batches,
                                     lambda window, feed: self.quantize_window(window, feed, config, weighting),
                                     progress))
        if weighting.details:
            out.details["weighting"] = weighting.details
        return out

    def quantize_window(self, window: Window, feed: Feed, config, weighting: TokenWeighting | None = None) -> QuantOutput:
        """One window; with a weighting, the scale search's error weighs each token by it."""
        params: AWQParams = config.params
        if weighting is not None:
            feed = weighted(feed, weighting.weights_for(window, feed))
        inputs, row_weights = _gather_rows(window.targets, feed, params.seed)
        out = QuantOutput()
        # 1) Search and apply every scale on the FP weights first; a producer Linear (v_proj,
        #    up_proj) must be rescaled before it is itself rounded.
        rounded = {t.module for t in window.targets}
        for block in window.blocks:
            names = {id(m): n for n, m in block.module.named_modules()}
            for members, fold_target in _scale_groups(block, window.layout):
                if members[0].name not in inputs:   # no calibration input: rounded plainly below
                    continue
                x = inputs[members[0].name]
                linears = [t.module for t in members]
                s, alpha, _ = awq.search_scale(x, linears, bits=members[0].bits, group_size=config.group_size,
                                               sym=config.sym, n_grid=params.n_grid,
                                               row_weights=row_weights.get(members[0].name))
                if alpha == 0:   # s = 1: nothing to fold, and no explicit scale to pay 16 bits/channel for
                    continue
                if fold_target is not None:
                    fold = awq.fold_into_linear if isinstance(fold_target, nn.Linear) else awq.fold_into_norm
                    fold(fold_target, linears, s)
                    # The fold rescales the producer's parameters; a target's weight is rounded later
                    # (the entry holds it as codes), anything else (norm gain and bias, a producer's
                    # bias, a producer left at 16 bits) is declared as changed. Declaring a rounded
                    # weight too put a second, 16-bit copy of every v_proj and up_proj in the entry:
                    # 4 GB more to pin and write for a 7B language model (benchmarks/perf/RESULTS.md).
                    out.changed.update(f"{block.name}.{names[id(fold_target)]}.{p}"
                                       for p, param in fold_target.named_parameters()
                                       if not (param is getattr(fold_target, "weight", None) and fold_target in rounded))
                else:
                    awq.attach_input_scale(linears[0], s)
                for t in members:
                    inputs[t.name] = x / s
                    out.details[t.name] = {"alpha": alpha, "fold": "explicit" if fold_target is None else
                                           names.get(id(fold_target), "?")}
        # 2) Clip search on the scaled weights with the scaled inputs, then round.
        for target in window.targets:
            weight = target.module.weight
            if target.name not in inputs:
                out.details[target.name] = {"fallback": NO_INPUT}
            with torch.no_grad():
                if params.clip and window.layout.clips(target.name) and target.name in inputs:
                    max_val = awq.search_clip(inputs[target.name], weight, bits=target.bits,
                                              group_size=config.group_size, sym=config.sym, n_grid=params.n_grid)
                    weight.copy_(awq.apply_clip(weight, max_val, config.group_size))
                result = fake_quantize(weight, target.bits, config.group_size, config.sym)
                weight.copy_(result.dequantized)
            out.add(target.name, target.component, target.bits, result, config.sym,
                    extra_bits=awq.input_scale_bits(target.module))
        return out

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The explicit input scales (where no fold exists), by buffer name."""
        return {name: b.detach().cpu() for name, b in model.named_buffers() if name.endswith(awq.SCALE_BUFFER)}

    def restore(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            owner, _, buffer = name.rpartition(".")
            if buffer != awq.SCALE_BUFFER:
                raise ValueError(f"AWQ cache state holds {name!r}, which is not an input scale")
            module = model.get_submodule(owner)
            module.register_buffer(buffer, value.to(module.weight.device))
            module.register_forward_pre_hook(awq.ExplicitInputScale())


def _gather_rows(targets: list[Target], feed: Feed, seed: int) -> tuple[dict[str, torch.Tensor],
                                                                           dict[str, torch.Tensor]]:
    """Each target's calibration input rows (float32), a seeded subsample of AWQ_MAX_ROWS when
    there are more, and the same rows' token weights where the feed carries them. Targets reading
    one input share its rows; the subsample is still drawn per target, in target order, from one
    generator."""
    parts: dict[str, list[torch.Tensor]] = {}
    weight_parts: dict[str, list[torch.Tensor]] = {}
    group_of: dict[str, str] = {}

    def keep(group, x, token_weights):
        key = group[0].name
        parts.setdefault(key, []).append(x.detach().reshape(-1, x.shape[-1]).float())
        if token_weights is not None:
            weight_parts.setdefault(key, []).append(token_weights.detach().reshape(-1).float())
        group_of.update({t.name: key for t in group})

    feed.gather(targets, keep)
    joined = {key: torch.cat(rows) for key, rows in parts.items()}
    joined_weights = {key: torch.cat(rows) for key, rows in weight_parts.items()
                      if sum(r.numel() for r in rows) == joined[key].shape[0]}
    generator = torch.Generator().manual_seed(seed)
    gathered, weights = {}, {}
    for target in targets:
        if target.name not in group_of:   # never called on the calibration batches (an unrouted expert)
            continue
        key = group_of[target.name]
        x, w = joined[key], joined_weights.get(key)
        if x.shape[0] > AWQ_MAX_ROWS:
            keep_rows = torch.randperm(x.shape[0], generator=generator)[:AWQ_MAX_ROWS]
            x = x[keep_rows.to(x.device)]
            w = None if w is None else w[keep_rows.to(w.device)]
        gathered[target.name] = x
        if w is not None:
            weights[target.name] = w
    return gathered, weights


def _scale_groups(block: Block, layout) -> list[tuple[list[Target], object]]:
    """(Linears sharing an input, where their scale folds) for the block's targets: a norm, a
    producer Linear, or None (an explicit input scale, counted in bpw)."""
    by_module = {t.module: t for t in block.targets}
    by_name = {t.name[len(block.name) + 1:]: t for t in block.targets}
    groups, grouped = [], set()
    for fold in norm_linear_pairs(block.module, layout):
        members = [by_module[m] for m in fold.linears if m in by_module]
        if members and len(members) == len(fold.linears):   # fold only when every fed Linear is ours
            groups.append((members, fold.norm))
            grouped.update(t.name for t in members)
    for producer, consumer in layout.linear_folds:
        if producer in by_name and consumer in by_name and consumer not in grouped:
            prev, nxt = by_name[producer], by_name[consumer]
            if prev.module.out_features == nxt.module.in_features:
                groups.append(([nxt], prev.module))
                grouped.add(nxt.name)
    groups += [([t], None) for t in block.targets if t.name not in grouped]
    return groups
