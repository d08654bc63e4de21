"""QuantConfig: what to quantize, how, and with which method (one frozen, hashable value).

A method's own settings are a typed, frozen MethodParams subclass declared by the method
(quantizers/methods/); make_config turns a grid's `params:` mapping into it, naming any field
the method does not have.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

LAYER_TYPES = ("attention", "mlp", "both")
# The suite's component vocabulary; each model family maps the ones it has to its modules.
COMPONENT_NAMES = ("vision", "qformer", "connector", "language", "lm_head")
MIN_BITS, MAX_BITS = 2, 8
FULL_PRECISION = 16
ACTIVATION_BITS = (4, 6, 8)      # below 16; each has its mark (a4, a6, a8)
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
        params = cls(**raw)
        params.validate(where)
        return params

    def validate(self, where: str) -> None:
        """Check the values, not only their types (a negative damping, an empty search range);
        a method's Params overrides this and raises ConfigError naming `where` and the field."""

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


@dataclass(frozen=True)
class QuantConfig:
    name: str
    method: str = "fp"
    w_bits: tuple[tuple[str, int], ...] = ()     # (component, bits); absent = full precision
    a_bits: int | None = None                    # activation bits; None = 16
    a_quant: ActivationQuant = ActivationQuant()  # how, when a_bits is set (default: dynamic per token)
    group_size: int = -1                         # -1: one scale per output channel
    sym: bool = False
    layers: str = "all"          # all | first | middle | last (thirds of each stack) | "0-3" | "0,2,5"
    layer_types: str = "both"    # attention | mlp | both
    params: MethodParams = MethodParams()         # the method's own typed parameters

    def __post_init__(self) -> None:
        from quantizers.methods import get_method   # the registry imports this module
        where = f"config {self.name!r}"
        method = get_method(self.method, where)
        if not isinstance(self.params, method.Params):
            raise ConfigError(f"{where}: params must be {method.Params.__name__}, got {type(self.params).__name__}")
        if not method.changes_weights and (self.w_bits or self.a_bits):
            raise ConfigError(f"{where}: method {self.method} takes no bits")
        if method.changes_weights and not self.w_bits:
            raise ConfigError(f"{where}: method {self.method} needs bits for at least one component")
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
        found = {"method": self.method, "w_bits": list(self.w_bits), "a_bits": self.a_bits,
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
        from quantizers.methods import get_method
        return get_method(self.method).calibrates or (self.quantizes_activations and self.a_quant.static)

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


def group_width(in_features: int, group_size: int) -> int:
    """Columns per quantization group: -1, or a group as wide as the row or wider, is one group
    per output channel. The one place this rule lives (RTN, GPTQ, AWQ and the cache use it)."""
    return in_features if group_size == -1 or group_size >= in_features else group_size


def make_config(name: str, method: str, bits: Mapping[str, int] | None = None, **kwargs) -> QuantConfig:
    """A QuantConfig from plain values; `params` is a mapping parsed into the method's type."""
    from quantizers.methods import get_method
    params = kwargs.pop("params", None)
    if not isinstance(params, MethodParams):
        params = get_method(method, f"config {name!r}").Params.parse(params, f"config {name!r}: params")
    if kwargs.get("a_quant") is None:   # not given: the method's default (its authors' quantizers)
        kwargs.pop("a_quant", None)
        if kwargs.get("a_bits"):
            kwargs["a_quant"] = get_method(method, f"config {name!r}").default_a_quant
    return QuantConfig(name=name, method=method, w_bits=tuple(sorted((bits or {}).items())),
                       params=params, **kwargs)
