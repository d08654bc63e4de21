"""Where a per-channel scale can move between a norm layer and the Linears it feeds, exactly.

A norm's output channel c only reaches the next Linears through their input column c, so
dividing the norm's gain (and bias) by s_c and multiplying those columns by s_c leaves the
function unchanged. This holds for pre-LN blocks (Llama: input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up; CLIP/ViT: layer_norm1 -> q/k/v, layer_norm2 -> fc1) and
never across a nonlinearity. AWQ folds its scales along these pairs; the tiny checkpoints use
them to plant outlier channels.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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


# (norm attribute, Linears it feeds) for the pre-LN block layouts the suite knows: Llama, CLIP,
# BLIP-2's vision encoder (one fused qkv Linear) and OPT (pre-LN only: see _pre_ln). The
# Q-Former is post-LN (its norms also feed the residual): no exact fold exists there.
_PATTERNS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("layer_norm1", ("self_attn.qkv",)),
    ("layer_norm2", ("mlp.fc1",)),
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("final_layer_norm", ("fc1",)),
)


def _pre_ln(module: nn.Module) -> bool:
    """OPT layers built with do_layer_norm_before=False (OPT-350m) normalize after the residual
    add, so their norms feed the residual too and folding into them would change the function."""
    return getattr(module, "do_layer_norm_before", True)


def norm_linear_pairs(root: nn.Module) -> list[NormFold]:
    folds = []
    for prefix, module in root.named_modules():
        if not _pre_ln(module):
            continue
        for norm_attr, linear_paths in _PATTERNS:
            norm = getattr(module, norm_attr, None)
            if norm is None or not hasattr(norm, "weight"):
                continue
            linears = _children(module, *linear_paths)
            if linears:
                folds.append(NormFold(f"{prefix}.{norm_attr}" if prefix else norm_attr, norm, linears))
    return folds
