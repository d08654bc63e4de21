"""The method registry: each quantization method is one Method subclass in its own module here
that registers itself (@register_method), with its typed parameters (a MethodParams dataclass),
the rules it sets on a config (validate), whether it needs calibration data, how it quantizes a
model's targets, and which extra state it leaves on the model that the quantized-model cache
must store and restore. The registry finds the modules itself (quantizers/registry.py): a new
method is one new module here and nothing else is edited.

A config resolves its method name here once, when it is made (quantizers.config.make_config);
generic code (the grid, the runtime, quantizers.api) then asks the config's method object and
never looks a method up or branches on its name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from quantizers.bpw import LayerRecord
from quantizers.params import ActivationQuant, ConfigError, MethodParams
from quantizers.primitives import QuantizedTensor
from quantizers.registry import Registry


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
    """A quantization method. Subclasses set the class attributes and implement quantize(); one
    that works window by window (a block or a few blocks of a stack over the calibration walker)
    also implements quantize_window, so another method can round its windows with it (Q-VLM).

    A method object holds no state of its own: every instance of a class is the same method."""
    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    calibrates: ClassVar[bool] = False       # needs calibration batches (never from the evaluated split)
    changes_weights: ClassVar[bool] = True   # False only for the unquantized baseline
    marks: ClassVar[tuple[str, ...]] = ()    # pytest marks besides the method's name (the baseline: fp16)
    # Kept in the on-disk cache: worth it when building costs far more than reading back (a
    # calibrated method); RTN of a 13B model takes seconds on a GPU, writing its codes minutes.
    cached: ClassVar[bool] = True
    # Seconds to quantize a language model, relative to GPTQ (measured on LLaVA-1.5-7B on an H200:
    # GPTQ 116 s, AWQ 51 s, RTN about 2 s). Only used to order and balance work across xdist
    # workers and shards, so a rough figure is enough.
    relative_cost: ClassVar[float] = 1.0
    # How activations are quantized when a config sets a_bits and no a_quant (the authors' choice).
    default_a_quant: ClassVar[ActivationQuant] = ActivationQuant()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def validate(self, config, where: str) -> None:
        """The rules this method sets on a whole config, checked when the config is made (at grid
        load, not at quantization time): its parameters' type and values, and the bits it needs.
        Raises ConfigError naming `where` and the field."""
        self.check_params(config, where)
        if not config.w_bits:
            raise ConfigError(f"{where}: method {self.name} needs bits for at least one component")

    def check_params(self, config, where: str) -> None:
        if not isinstance(config.params, self.Params):
            raise ConfigError(f"{where}: params must be {self.Params.__name__}, got {type(config.params).__name__}")
        config.params.validate(f"{where}: params")

    @classmethod
    def quantizes_windows(cls) -> bool:
        """Implements quantize_window: another method can compose it (round its windows with it)."""
        return cls.quantize_window is not Method.quantize_window

    def quantize(self, adapter, targets: list, config, batches: list[dict] | None,
                 progress: bool = False) -> QuantOutput:
        """Quantize every target's weight in place (fake-quant: rounded and written back)."""
        raise NotImplementedError

    def quantize_window(self, window, feed, config, weighting=None) -> QuantOutput:
        """Quantize the targets of one walker window (quantizers.walker.Window) in place, its
        calibration inputs in `feed` (quantized upstream); with a TokenWeighting where the method
        takes one. Only for methods that work window by window."""
        raise NotImplementedError(f"method {self.name} does not quantize window by window")

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors besides weights and changed parameters that the method left on the model."""
        return {}

    def restore(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Put state() back on a fresh FP copy of the model (hooks included)."""
        if state:
            raise ValueError(f"method {self.name} keeps no state, but the cache entry holds {sorted(state)[:3]}")


# Registered are the classes (a module imported again re-registers the same class, not a clash);
# a config holds an instance.
METHODS: Registry[type[Method]] = Registry("method", __name__, error=ConfigError)


def register_method(cls: type[Method]) -> type[Method]:
    return METHODS.register(cls.name, cls)


def resolve_method(name: object, where: str) -> Method:
    """The method a config names, as an object: the one place a method is looked up by name."""
    return METHODS.get(name, where)()


def all_methods() -> dict[str, type[Method]]:
    """Every registered method by name (the plugin registers a mark for each)."""
    return METHODS.all()
