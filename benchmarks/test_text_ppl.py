"""The language model alone, through lm-eval: perplexity on held-out text (lower is better)."""
from fixtures.runtime.session import check_expectation

TASK = "text_ppl"


def test_text_ppl(case, outcome):
    check_expectation(outcome)
