"""QuantConfig: what to quantize, how, and with which method (one frozen, hashable value).

A config carries its method object, resolved once from the registry (quantizers/methods/) when
it is made; the method checks the config then (its parameters' values included), so a config
that exists can be run. A method's own settings are a typed, frozen MethodParams subclass
declared by the method; make_config turns a grid's `params:` mapping into it, naming any field
the method does not have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from quantizers.methods import Method, resolve_method
from quantizers.params import ActivationQuant, ConfigError, MethodParams

LAYER_TYPES = ("attention", "mlp", "both")
# The suite's component vocabulary; each model family maps the ones it has to its modules.
COMPONENT_NAMES = ("vision", "qformer", "connector", "language", "lm_head")
MIN_BITS, MAX_BITS = 2, 8
FULL_PRECISION = 16
ACTIVATION_BITS = (4, 6, 8)      # below 16; each has its mark (a4, a6, a8)
@dataclass(frozen=True)
class QuantConfig:
    name: str
    method: Method                               # resolved from the registry by make_config
    w_bits: tuple[tuple[str, int], ...] = ()     # (component, bits); absent = full precision
    a_bits: int | None = None                    # activation bits; None = 16
    a_quant: ActivationQuant = ActivationQuant()  # how, when a_bits is set (default: dynamic per token)
    group_size: int = -1                         # -1: one scale per output channel
    sym: bool = False
    layers: str = "all"          # all | first | middle | last (thirds of each stack) | "0-3" | "0,2,5"
    layer_types: str = "both"    # attention | mlp | both
    params: MethodParams = MethodParams()         # the method's own typed parameters

    def __post_init__(self) -> None:
        where = f"config {self.name!r}"
        if not isinstance(self.method, Method):
            raise ConfigError(f"{where}: method must be a registered method object (make_config resolves "
                              f"a name), got {self.method!r}")
        self.method.validate(self, where)
        for component, bits in self.w_bits:
            if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise ConfigError(f"{where}: bits for {component!r} must be an integer in "
                                  f"{MIN_BITS}..{MAX_BITS}, got {bits!r}")
        if self.a_bits is not None and self.a_bits not in (*ACTIVATION_BITS, FULL_PRECISION):
            raise ConfigError(f"{where}: a_bits must be one of {', '.join(map(str, ACTIVATION_BITS))} or 16, "
                              f"got {self.a_bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 8):
            raise ConfigError(f"{where}: group_size must be -1 (per channel) or >= 8, got {self.group_size!r}")
        if self.layer_types not in LAYER_TYPES:
            raise ConfigError(f"{where}: layer_types must be one of {', '.join(LAYER_TYPES)}, got {self.layer_types!r}")
        try:
            layer_filter(self.layers, 3)
        except ValueError as err:
            raise ConfigError(f"{where}: layers: {err}") from None

    @property
    def bits(self) -> dict[str, int]:
        return dict(self.w_bits)

    @property
    def components(self) -> list[str]:
        return [c for c, _ in self.w_bits]

    @property
    def weight_bits_label(self) -> str:
        return ",".join(f"{c}={b}" for c, b in self.w_bits)

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the quantized weights (not the display name)."""
        found = {"method": self.method.name, "w_bits": list(self.w_bits), "a_bits": self.a_bits,
                 "group_size": self.group_size, "sym": self.sym, "layers": self.layers,
                 "layer_types": self.layer_types, "params": self.params.as_dict()}
        if self.quantizes_activations:   # only then: weight-only configs keep their hashes
            found["a_quant"] = dataclasses.asdict(self.a_quant)
        return found

    @property
    def quantizes_activations(self) -> bool:
        return bool(self.a_bits) and self.a_bits < FULL_PRECISION

    @property
    def activation_label(self) -> str:
        """e.g. a4-tensor-minmax-asym; "" for 16-bit activations."""
        return self.a_quant.label(self.a_bits) if self.quantizes_activations else ""

    @property
    def calibrates(self) -> bool:
        """Needs calibration batches: the method does, or static activation ranges are fitted."""
        return self.method.calibrates or (self.quantizes_activations and self.a_quant.static)

    def hash(self, *extra: Any) -> str:
        blob = json.dumps([self.fingerprint(), *extra], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def layer_filter(spec: str, depth: int) -> set[int]:
    """Block indices of a stack of `depth` blocks that a `layers` spec selects: the paper's
    first/middle/last thirds (boundaries rounded, so 32 blocks split 11/10/11 and a 2-block
    stack has an empty middle), a range "0-3" or a list "0,2,5"."""
    spec = str(spec).strip()
    low, high = round(depth / 3), round(2 * depth / 3)
    named = {"all": range(depth), "first": range(low), "middle": range(low, high),
             "last": range(high, depth)}
    if spec in named:
        return set(named[spec])
    chosen: set[int] = set()
    for part in spec.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"expected all, first, middle, last, a range like 0-3 or a list like 0,2; got {spec!r}")
        chosen.update(range(int(low), int(high) + 1) if dash else {int(low)})
    return chosen


def make_config(name: str, method: str, bits: Mapping[str, int] | None = None, **kwargs) -> QuantConfig:
    """A QuantConfig from plain values: `method` is a registered name, resolved here to its
    object; `params` is a mapping parsed into the method's type (or that type itself)."""
    where = f"config {name!r}"
    resolved = resolve_method(method, where)
    params = kwargs.pop("params", None)
    if not isinstance(params, MethodParams):
        params = resolved.Params.parse(params, f"{where}: params")
    if kwargs.get("a_quant") is None:   # not given: the method's default (its authors' quantizers)
        kwargs.pop("a_quant", None)
        if kwargs.get("a_bits"):
            kwargs["a_quant"] = resolved.default_a_quant
    return QuantConfig(name=name, method=resolved, w_bits=tuple(sorted((bits or {}).items())),
                       params=params, **kwargs)
