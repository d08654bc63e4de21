"""VQAv2 over every (model, quant config) of the grid: official 10-answer accuracy."""
from fixtures.runtime.session import check_expectation

TASK = "vqav2"


def test_vqav2(case, outcome):
    check_expectation(outcome)
