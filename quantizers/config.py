"""QuantConfig: what to quantize, how, and with which method (one frozen, hashable value)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

METHODS = ("fp", "rtn", "gptq", "awq", "qvlm", "qig")
IMPLEMENTED_METHODS = ("fp", "rtn")
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
                "group_size": self.group_size, "sym": self.sym, "params": list(self.params)}

    def hash(self, *extra: Any) -> str:
        blob = json.dumps([self.fingerprint(), *extra], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_config(name: str, method: str, bits: Mapping[str, int] | None = None, **kwargs) -> QuantConfig:
    params = kwargs.pop("params", None) or {}
    return QuantConfig(name=name, method=method, w_bits=tuple(sorted((bits or {}).items())),
                       params=tuple(sorted(params.items())), **kwargs)
