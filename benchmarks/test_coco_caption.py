"""COCO captioning over every (model, quant config) of the grid: pycocoevalcap scores, CIDEr primary."""
from fixtures.runtime.session import check_expectation

TASK = "coco_caption"


def test_coco_caption(case, outcome):
    check_expectation(outcome)
