"""Where a per-channel scale can move between a norm layer and the Linears it feeds, exactly.

A norm's output channel c only reaches the next Linears through their input column c, so
dividing the norm's gain (and bias) by s_c and multiplying those columns by s_c leaves the
function unchanged. This holds for pre-LN blocks (Llama: input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up; CLIP/ViT: layer_norm1 -> q/k/v, layer_norm2 -> fc1) and
never across a nonlinearity. AWQ folds its scales along these pairs; the tiny checkpoints use
them to plant outlier channels.

Which pairs a block has is family knowledge: a BlockLayout names them, and each model adapter
says which layout each of its components uses (fixtures/adapters/layouts.py holds the tables).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockLayout:
    """What the quantizers need to know about one kind of transformer block, by module name."""
    # (norm attribute, Linears it feeds, relative to the module holding the norm)
    norm_folds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (producer Linear, consumer Linear) pairs inside a block whose scale folds exactly
    linear_folds: tuple[tuple[str, str], ...] = ()
    # a Linear is attention when one of these is a part of its dotted name
    attention: tuple[str, ...] = ("self_attn", "attention", "crossattention", "attn")
    # Linears AWQ's clip search skips, by name suffix (the reference: softmax amplifies the error)
    no_clip: tuple[str, ...] = ()
    # a module attribute that, when False, means its norms also feed the residual (OPT-350m's
    # post-LN layers): folding into them would change the function
    pre_ln_flag: str | None = None

    def is_attention(self, linear_name: str) -> bool:
        return any(part in self.attention for part in linear_name.split("."))

    def clips(self, linear_name: str) -> bool:
        return not linear_name.endswith(self.no_clip)

    def merged(self, *others: "BlockLayout") -> "BlockLayout":
        """One layout holding every pattern of self and others (for whole-model scans)."""
        layouts = (self, *others)

        def union(field: str) -> tuple:
            return tuple(dict.fromkeys(item for layout in layouts for item in getattr(layout, field)))

        flags = {layout.pre_ln_flag for layout in layouts if layout.pre_ln_flag}
        if len(flags) > 1:
            raise ValueError(f"layouts disagree on the pre-LN flag: {sorted(flags)}")
        return BlockLayout(union("norm_folds"), union("linear_folds"), union("attention"), union("no_clip"),
                           next(iter(flags), None))


@dataclass(frozen=True)
class NormFold:
    name: str                     # the norm's qualified name
    norm: nn.Module
    linears: tuple[nn.Linear, ...]


def _children(module: nn.Module, *paths: str) -> tuple[nn.Linear, ...] | None:
    found = []
    for path in paths:
        try:
            found.append(module.get_submodule(path))
        except AttributeError:
            return None
    return tuple(found) if all(isinstance(m, nn.Linear) for m in found) else None


def norm_linear_pairs(root: nn.Module, layout: BlockLayout) -> list[NormFold]:
    """Every (norm, Linears) pair of the layout found in root or any module below it."""
    folds = []
    for prefix, module in root.named_modules():
        if layout.pre_ln_flag and not getattr(module, layout.pre_ln_flag, True):
            continue
        for norm_attr, linear_paths in layout.norm_folds:
            norm = getattr(module, norm_attr, None)
            if norm is None or not hasattr(norm, "weight"):
                continue
            linears = _children(module, *linear_paths)
            if linears:
                folds.append(NormFold(f"{prefix}.{norm_attr}" if prefix else norm_attr, norm, linears))
    return folds
