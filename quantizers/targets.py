"""Which Linears a config quantizes: every nn.Linear inside each named component.

Embeddings (nn.Embedding, the vision patch Conv2d) are never targets, and modules an adapter
marks as protected (lm_head) are targets only when a config names them as a component.
Layer groups (`layers`) and types (`layer_types`) select blocks of a component's stack of
transformer layers; a component without such a stack (the LLaVA projector) is taken whole.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantizers.config import ConfigError, QuantConfig, layer_filter

# Which Linears count as attention or MLP, by the module names the supported families use.
_ATTENTION = ("self_attn", "attention", "crossattention")


@dataclass(frozen=True)
class Target:
    name: str          # qualified name in the model
    component: str
    module: nn.Linear
    bits: int


def block_stack(component: nn.Module) -> tuple[str, list[nn.Module]]:
    """The longest nn.ModuleList inside a component (its transformer layers), as
    (relative prefix, blocks); the whole component when it has none."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in component.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        return "", [component]
    return best[0], list(best[1])


def select_targets(adapter, config: QuantConfig) -> list[Target]:
    components = adapter.components
    unknown = [c for c in config.components if c not in components]
    if unknown:
        raise ConfigError(f"config {config.name!r}: model family {adapter.family!r} has no component "
                          f"{', '.join(map(repr, unknown))}; it has: {', '.join(components)}")
    protected = {components[p] for p in getattr(adapter, "protected", ())}
    targets: list[Target] = []
    for component, bits in config.w_bits:
        prefix = components[component]
        root = adapter.model.get_submodule(prefix)
        stack, blocks = block_stack(root)
        chosen = layer_filter(config.layers, len(blocks)) if stack else None
        for sub_name, module in root.named_modules():
            name = f"{prefix}.{sub_name}" if sub_name else prefix
            if not isinstance(module, nn.Linear):
                continue
            if any(name == p or name.startswith(p + ".") for p in protected) and prefix not in protected:
                continue
            if chosen is not None and not _selected(sub_name, stack, chosen, config.layer_types,
                                                   config.layers == "all"):
                continue
            targets.append(Target(name, component, module, bits))
    if not targets:
        raise ConfigError(f"config {config.name!r}: selects no Linear layer in {adapter.name} "
                          f"(layers={config.layers!r}, layer_types={config.layer_types!r})")
    return targets


def _selected(sub_name: str, stack: str, chosen: set[int], layer_types: str, layers_all: bool) -> bool:
    """Layer groups and types apply to the blocks of a stack; Linears outside the stack
    (e.g. a final projection) are kept only when every block is selected."""
    head, _, rest = sub_name.partition(stack + ".")
    index, _, inner = rest.partition(".")
    if head or not index.isdigit():
        return layers_all and layer_types == "both"
    if int(index) not in chosen:
        return False
    is_attention = any(part in _ATTENTION for part in inner.split("."))
    return layer_types == "both" or (layer_types == "attention") == is_attention
