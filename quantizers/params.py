"""What a quantization config and its method share, below both: the typed parameters every
method declares (MethodParams), how activations are quantized (ActivationQuant) and the error a
config that can't be run raises. quantizers/config.py builds configs from these and resolves
each config's method through the registry (quantizers/methods/), which builds on this module
too, so neither imports the other's dependents back (no import cycle).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

# quantizers/activations.py explains each; "official" is Q-VLM's code's mix, resolved per Linear.
ACTIVATION_GRANULARITIES = ("token", "tensor", "channel", "position", "channel_dynamic", "official")
STATIC_GRANULARITIES = ("tensor", "channel", "position", "official")   # ranges fitted on calibration data
ACTIVATION_CLIPS = ("minmax", "percentile")
DECODE_RULES = ("clip", "widen")


class ConfigError(ValueError):
    """A quantization config that can't be run; the message names the field."""


@dataclass(frozen=True)
class MethodParams:
    """Base of every method's parameters: a frozen dataclass, so it is hashable and part of the
    config's identity (defaults included: changing a default changes the cache key)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def marks(self) -> tuple[str, ...]:
        """pytest marks the parameters add to a config's (a token weighting: `qig`)."""
        return ()

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, where: str) -> "MethodParams":
        raw = dict(raw or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            allowed = ", ".join(fields) or "none"
            raise ConfigError(f"{where}: unknown parameter(s) {', '.join(unknown)}; allowed: {allowed}")
        for name, value in raw.items():
            expected = getattr(fields[name].type, "__name__", fields[name].type)
            kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}.get(str(expected), (object,))
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ConfigError(f"{where}: parameter {name} must be {expected}, got {value!r}")
        return cls(**raw)   # its values are checked with the config (the method's validate)

    def validate(self, where: str) -> None:
        """Check the values, not only their types (a negative damping, an empty search range),
        when the config is made; a method's Params overrides this and raises ConfigError naming
        `where` and the field."""

    def _require(self, where: str, name: str, ok: bool, rule: str) -> None:
        """For validate(): raise unless ok, naming the parameter, the rule and the value."""
        if not ok:
            raise ConfigError(f"{where}: parameter {name} must be {rule}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ActivationQuant:
    """How activations are quantized when a config sets a_bits (the grid's `a_quant:`); the
    arithmetic and the hooks are in quantizers/activations.py, which explains each choice."""
    granularity: str = "token"
    clip: str = "minmax"
    percentile: float = 0.999   # with clip: percentile; 1.0 would be min-max
    sym: bool = False
    # A decode step's token (one new token per sequence): "clip" quantizes it on the range like
    # any token; "widen" widens the range to hold it, so generated tokens are never clipped (Q-VLM's
    # code). Empty: the granularity's default, widen for "official", clip otherwise.
    decode: str = ""

    def __post_init__(self) -> None:
        if not self.decode:
            object.__setattr__(self, "decode", "widen" if self.granularity == "official" else "clip")

    @property
    def static(self) -> bool:
        """Some Linear's range is fitted once on calibration data (not taken from the input)."""
        return self.granularity in STATIC_GRANULARITIES

    def label(self, bits: int) -> str:
        clip = f"p{self.percentile:g}" if self.clip == "percentile" else self.clip
        widen = "-widen" if self.decode == "widen" and self.granularity != "token" else ""
        return (f"a{bits}-{self.granularity}-{clip if self.static else 'dynamic'}-{'sym' if self.sym else 'asym'}"
                f"{widen}")

    @classmethod
    def parse(cls, raw: Mapping | None, where: str) -> "ActivationQuant":
        raw = dict(raw or {})
        allowed = ("granularity", "clip", "percentile", "sym", "decode")
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        for name in ("granularity", "clip", "decode"):
            if name in raw and not isinstance(raw[name], str):
                raise ConfigError(f"{where}: {name} must be a string, got {raw[name]!r}")
        if "sym" in raw and not isinstance(raw["sym"], bool):
            raise ConfigError(f"{where}: sym must be true or false, got {raw['sym']!r}")
        spec = cls(**raw)
        if spec.granularity not in ACTIVATION_GRANULARITIES:
            raise ConfigError(f"{where}: granularity must be one of {', '.join(ACTIVATION_GRANULARITIES)}, got {spec.granularity!r}")
        if spec.clip not in ACTIVATION_CLIPS:
            raise ConfigError(f"{where}: clip must be one of {', '.join(ACTIVATION_CLIPS)}, got {spec.clip!r}")
        if spec.decode not in DECODE_RULES:
            raise ConfigError(f"{where}: decode must be one of {', '.join(DECODE_RULES)}, got {spec.decode!r}")
        if spec.clip == "percentile" and not spec.static:
            raise ConfigError(f"{where}: clip percentile needs a static granularity "
                              f"({', '.join(STATIC_GRANULARITIES)})")
        if isinstance(spec.percentile, bool) or not isinstance(spec.percentile, (int, float)) \
                or not 0.5 < spec.percentile <= 1.0:
            raise ConfigError(f"{where}: percentile must be a number in (0.5, 1], got {spec.percentile!r}")
        return spec
