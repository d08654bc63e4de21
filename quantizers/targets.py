"""Which Linears a config quantizes: every nn.Linear inside each named component.

Embeddings (nn.Embedding, the vision patch Conv2d) are never targets, and modules an adapter
marks as protected (lm_head) are targets only when a config names them as a component.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantizers.config import ConfigError, QuantConfig


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
        prefix = components[component]
        root = adapter.model.get_submodule(prefix)
        for sub_name, module in root.named_modules():
            name = f"{prefix}.{sub_name}" if sub_name else prefix
            if not isinstance(module, nn.Linear):
                continue
            if any(name == p or name.startswith(p + ".") for p in protected) and prefix not in protected:
                continue
            targets.append(Target(name, component, module, bits))
    if not targets:
        raise ConfigError(f"config {config.name!r}: selects no Linear layer in {adapter.name}")
    return targets
