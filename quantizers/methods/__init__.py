"""The method registry: each quantization method is one Method subclass in its own module here,
registered by name, with its typed parameters (a MethodParams dataclass), whether it needs
calibration data, how it quantizes a model's targets, and which extra state it leaves on the
model that the quantized-model cache must store and restore.

Generic code (the grid, the runtime, quantizers.api) asks these questions of the method object
and never branches on a method's name. A new method (Q-VLM, QIG) is a new module here.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from quantizers.bpw import LayerRecord
from quantizers.config import ActivationQuant, ConfigError, MethodParams
from quantizers.primitives import QuantizedTensor


@dataclass
class QuantOutput:
    """What quantizing some targets produced: per-layer records (bpw), the integer form of each
    weight (the cache), the non-target parameters a method changed on purpose (AWQ's folds), and
    per-layer details for the report."""
    layers: list[LayerRecord] = field(default_factory=list)
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    details: dict[str, dict] = field(default_factory=dict)
    # Static activation ranges a method chose itself (Q-VLM's clipping search), by Linear name;
    # empty: quantizers.api fits them on the calibration batches when the config needs them.
    activation_ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def add(self, name: str, component: str, bits: int, result: QuantizedTensor, sym: bool,
            extra_bits: int = 0) -> None:
        self.quantized[name] = result
        self.layers.append(LayerRecord(name, component, bits, result.codes.numel(), result.scale.numel(), sym,
                                       extra_bits=extra_bits))

    @classmethod
    def merge(cls, outputs: list["QuantOutput"]) -> "QuantOutput":
        merged = cls()
        for other in outputs:
            merged.layers += other.layers
            merged.quantized.update(other.quantized)
            merged.changed |= other.changed
            merged.details.update(other.details)
            merged.activation_ranges.update(other.activation_ranges)
        return merged


class Method:
    """A quantization method. Subclasses set the class attributes and implement quantize()."""
    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    calibrates: ClassVar[bool] = False       # needs calibration batches (never from the evaluated split)
    changes_weights: ClassVar[bool] = True   # False only for the unquantized baseline
    # Kept in the on-disk cache: worth it when building costs far more than reading back (a
    # calibrated method); RTN of a 13B model takes seconds on a GPU, writing its codes minutes.
    cached: ClassVar[bool] = True
    # Seconds to quantize a language model, relative to GPTQ (measured on LLaVA-1.5-7B on an H200:
    # GPTQ 116 s, AWQ 51 s, RTN about 2 s). Only used to order and balance work across xdist
    # workers and shards, so a rough figure is enough.
    relative_cost: ClassVar[float] = 1.0
    # How activations are quantized when a config sets a_bits and no a_quant (the authors' choice).
    default_a_quant: ClassVar[ActivationQuant] = ActivationQuant()

    def quantize(self, adapter, targets: list, config, batches: list[dict] | None,
                 progress: bool = False) -> QuantOutput:
        """Quantize every target's weight in place (fake-quant: rounded and written back)."""
        raise NotImplementedError

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors besides weights and changed parameters that the method left on the model."""
        return {}

    def restore(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Put state() back on a fresh FP copy of the model (hooks included)."""
        if state:
            raise ValueError(f"method {self.name} keeps no state, but the cache entry holds {sorted(state)[:3]}")


_METHODS: dict[str, Method] = {}
_DISCOVERED: list[bool] = []


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls()
    return cls


def _discover() -> None:
    if not _DISCOVERED:
        _DISCOVERED.append(True)
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")


def all_methods() -> dict[str, Method]:
    _discover()
    return dict(_METHODS)


def get_method(name: Any, where: str = "config") -> Method:
    methods = all_methods()
    if name not in methods:
        raise ConfigError(f"{where}: unknown method {name!r}; known: {', '.join(methods)}")
    return methods[name]
