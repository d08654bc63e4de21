"""ScienceQA (IMG) over every (model, quant config) of the grid: option-letter accuracy."""
from fixtures.runtime.session import check_expectation

TASK = "scienceqa"


def test_scienceqa(case, outcome):
    check_expectation(outcome)
