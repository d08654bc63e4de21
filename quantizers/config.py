"""QuantConfig: what to quantize, how, and with which method (one frozen, hashable value)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

METHODS = ("fp", "rtn", "gptq", "awq", "qvlm", "qig")
LAYER_TYPES = ("attention", "mlp", "both")
# The suite's component vocabulary; each model family maps the ones it has to its modules.
COMPONENT_NAMES = ("vision", "qformer", "connector", "language", "lm_head")
IMPLEMENTED_METHODS = ("fp", "rtn", "gptq", "awq")
MIN_BITS, MAX_BITS = 2, 8
FULL_PRECISION = 16


class ConfigError(ValueError):
    """A quantization config that can't be run; the message names the field."""


@dataclass(frozen=True)
class QuantConfig:
    name: str
    method: str = "fp"
    w_bits: tuple[tuple[str, int], ...] = ()     # (component, bits); absent = full precision
    a_bits: int | None = None                    # activation bits (dynamic, per token); None = 16
    group_size: int = -1                         # -1: one scale per output channel
    sym: bool = False
    layers: str = "all"          # all | first | middle | last (thirds of each stack) | "0-3" | "0,2,5"
    layer_types: str = "both"    # attention | mlp | both
    params: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        where = f"config {self.name!r}"
        if self.method not in METHODS:
            raise ConfigError(f"{where}: unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.method == "fp" and (self.w_bits or self.a_bits):
            raise ConfigError(f"{where}: method fp takes no bits")
        if self.method != "fp" and not self.w_bits:
            raise ConfigError(f"{where}: method {self.method} needs bits for at least one component")
        for component, bits in self.w_bits:
            if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise ConfigError(f"{where}: bits for {component!r} must be an integer in "
                                  f"{MIN_BITS}..{MAX_BITS}, got {bits!r}")
        if self.a_bits is not None and (not isinstance(self.a_bits, int) or not 4 <= self.a_bits <= 16):
            raise ConfigError(f"{where}: a_bits must be an integer in 4..16, got {self.a_bits!r}")
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
        return {"method": self.method, "w_bits": list(self.w_bits), "a_bits": self.a_bits,
                "group_size": self.group_size, "sym": self.sym, "layers": self.layers,
                "layer_types": self.layer_types, "params": list(self.params)}

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
    params = kwargs.pop("params", None) or {}
    return QuantConfig(name=name, method=method, w_bits=tuple(sorted((bits or {}).items())),
                       params=tuple(sorted(params.items())), **kwargs)
