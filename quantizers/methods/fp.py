"""The unquantized baseline: a method that changes nothing, so FP rows share every code path.
Generic code asks it (changes_weights) rather than comparing names: it takes no bits, builds no
cache entry, and its rows reuse the model's FP evaluation."""
from quantizers.methods import Method, QuantOutput, register_method
from quantizers.params import ConfigError


@register_method
class FullPrecision(Method):
    name = "fp"
    changes_weights = False
    marks = ("fp16",)
    relative_cost = 0.0

    def validate(self, config, where: str) -> None:
        self.check_params(config, where)
        if config.w_bits or config.a_bits:
            raise ConfigError(f"{where}: method {self.name} takes no bits")

    def quantize(self, adapter, targets, config, batches=None, progress=False) -> QuantOutput:
        return QuantOutput()   # nothing is rounded
