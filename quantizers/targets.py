"""Which Linears a config quantizes: every nn.Linear inside each named component.

Embeddings (nn.Embedding, the vision patch Conv2d) are never targets, nor the Linears an
adapter lists in its protected_weights (a MoE router, a Linear patch embedding), and modules an
adapter marks as protected (lm_head) are targets only when a config names them as a component.
After quantization, unaccounted_weights proves the other side: no weight of a targeted
component was left at 16 bits without a declared reason.
Layer groups (`layers`) and types (`layer_types`) select blocks of a component's stack of
transformer layers; a component without such a stack (the LLaVA projector) is taken whole.
The stack and which Linears are attention come from the model adapter (its block_stack and
layout), never from module-name guesses here.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantizers.config import ConfigError, QuantConfig, layer_filter

@dataclass(frozen=True)
class Target:
    name: str          # qualified name in the model
    component: str
    module: nn.Linear
    bits: int


def select_targets(adapter, config: QuantConfig) -> list[Target]:
    components = adapter.components
    unknown = [c for c in config.components if c not in components]
    if unknown:
        raise ConfigError(f"config {config.name!r}: model family {adapter.family!r} has no component "
                          f"{', '.join(map(repr, unknown))}; it has: {', '.join(components)}")
    protected = {components[p] for p in getattr(adapter, "protected", ())}
    targets: list[Target] = []
    for component, bits in config.w_bits:
        kept = adapter.protected_weights(component) if hasattr(adapter, "protected_weights") else {}
        prefix = components[component]
        root = adapter.model.get_submodule(prefix)
        stack, blocks = adapter.block_stack(component)
        layout = adapter.layout(component)
        chosen = layer_filter(config.layers, len(blocks)) if stack else None
        for sub_name, module in root.named_modules():
            name = f"{prefix}.{sub_name}" if sub_name else prefix
            if not isinstance(module, nn.Linear) or f"{name}.weight" in kept:
                continue
            if any(name == p or name.startswith(p + ".") for p in protected) and prefix not in protected:
                continue
            if chosen is not None and not _selected(sub_name, stack, chosen, config.layer_types,
                                                   config.layers == "all", layout):
                continue
            targets.append(Target(name, component, module, bits))
    if not targets:
        raise ConfigError(f"config {config.name!r}: selects no Linear layer in {adapter.name} "
                          f"(layers={config.layers!r}, layer_types={config.layer_types!r})")
    return targets


def _selected(sub_name: str, stack: str, chosen: set[int], layer_types: str, layers_all: bool,
              layout) -> bool:
    """Layer groups and types apply to the blocks of a stack; Linears outside the stack
    (e.g. a final projection) are kept only when every block is selected."""
    head, _, rest = sub_name.partition(stack + ".")
    index, _, inner = rest.partition(".")
    if head or not index.isdigit():
        return layers_all and layer_types == "both"
    if int(index) not in chosen:
        return False
    is_attention = layout.is_attention(inner)
    return layer_types == "both" or (layer_types == "attention") == is_attention


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def unaccounted_weights(adapter, config: QuantConfig, quantized: set[str]) -> list[str]:
    """The weights (floating parameters of more than one dimension: Linears, MoE expert tensors,
    bare matrices) of the config's components that are neither in `quantized` (parameter names)
    nor in the adapter's protected_weights. A nested component's parameters belong to it alone.
    Empty when the config selects a subset of layers, which leaves the others by request."""
    if config.layers != "all" or config.layer_types != "both":
        return []
    components = adapter.components
    left = []
    for component in config.components:
        own = components[component]
        nested = [p for c, p in components.items() if c != component and p != own and _under(p, own)]
        kept = adapter.protected_weights(component) if hasattr(adapter, "protected_weights") else {}
        for name, param in adapter.model.named_parameters():
            if (_under(name, own) and not any(_under(name, p) for p in nested) and param.dim() > 1
                    and param.is_floating_point() and name not in quantized and name not in kept):
                left.append(name)
    return left
