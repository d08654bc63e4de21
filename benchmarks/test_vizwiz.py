"""VizWiz over every (model, quant config) of the grid: VQA accuracy, unanswerable AP and F1."""
from fixtures.runtime.session import check_expectation

TASK = "vizwiz"


def test_vizwiz(case, outcome):
    check_expectation(outcome)
