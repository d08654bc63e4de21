"""The unquantized baseline: a method that changes nothing, so FP rows share every code path."""
from quantizers.methods import Method, register_method


@register_method
class FullPrecision(Method):
    name = "fp"
    changes_weights = False
    relative_cost = 0.0
