"""Flickr30k retrieval over every (model, quant config) of the grid: ITC top-k re-ranked by ITM."""
from fixtures.runtime.session import check_expectation

TASK = "flickr_retrieval"


def test_flickr_retrieval(case, outcome):
    check_expectation(outcome)
