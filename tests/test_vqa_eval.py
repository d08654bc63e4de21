"""Hand-checked cases for the official VQAv2 normalization and accuracy rule."""

import pytest

from tasks.vqa_eval import normalize_answer, vqa_accuracy, vqa_accuracy_batch


@pytest.mark.parametrize(
    "raw, expected",
    [
        # Number words become digits, "none" included.
        ("two", "2"),
        ("none", "0"),
        ("ten", "10"),
        # Articles are dropped, after number mapping ("one" -> "1" is kept).
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("the red one", "red 1"),
        # Punctuation inside a token is replaced by a space ...
        ("yes!", "yes"),
        ("hot-dog", "hot dog"),
        # ... but deleted when it touches a space; here the result is the
        # same because the leftover double space is collapsed on split.
        ("hot - dog", "hot dog"),
        # Deletion applies to *every* occurrence of that char, so a spaced
        # dash elsewhere glues "hot-dog" together.
        ("hot-dog - yum", "hotdog yum"),
        # A digit,digit comma anywhere switches all punctuation to deletion.
        ("1,000", "1000"),
        ("1,000 hot-dogs", "1000 hotdogs"),
        # Periods go unless a digit follows.
        ("2.", "2"),
        ("3.5", "3.5"),
        ("u.s.", "us"),
        # Official quirk: at most 32 periods are removed (re.UNICODE == 32
        # is passed as the count), so the 33rd survives.
        ("." * 33 + "x", ".x"),
        # Contractions are repaired; apostrophes are not punctuation.
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("youre", "you're"),
        ("whats?", "what's"),
        ("don't", "don't"),
        # Lowercasing happens before the tables are consulted ...
        ("Yes", "yes"),
        ("Two", "2"),
        ("DONT", "don't"),
        # ... so the official capitalised key "Im" can never match.
        ("im", "im"),
        # Tabs/newlines become spaces; runs of spaces collapse.
        ("yes\tsir\n", "yes sir"),
        ("  red   car ", "red car"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "k, expected",
    # mean = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_ten_answer_rule(k, expected):
    answers = ["2"] * k + ["cat"] * (10 - k)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_unanimous_answers_are_not_normalized():
    # All "Two": the official script skips normalizing the answers, so they
    # stay "Two" and a normalized prediction ("2") can never match them.
    answers = ["Two"] * 10
    assert vqa_accuracy("2", answers) == 0.0
    assert vqa_accuracy("two", answers) == 0.0
    # Default mode normalizes the prediction regardless, so even "Two" misses.
    assert vqa_accuracy("Two", answers) == 0.0
    # The current official script leaves the prediction raw too in this case.
    assert vqa_accuracy("Two", answers, always_normalize_prediction=False) == 1.0
    assert vqa_accuracy("2", answers, always_normalize_prediction=False) == 0.0


def test_mixed_answers_are_normalized():
    # Not unanimous, so "Two"/"two."/"2" all normalize to "2": 3 matches
    # give 0.9; compared raw, only one would match (0.3).
    answers = ["Two", "two.", "2"] + ["dog"] * 7
    assert vqa_accuracy("2", answers) == pytest.approx(0.9)
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("2", answers, always_normalize_prediction=False) == (
        pytest.approx(0.9)
    )


def test_answer_whitespace_is_stripped_before_unanimity_check():
    # "yes\n", " yes" and "yes" are identical after stripping, so the set is
    # unanimous and the answers are compared as plain "yes".
    answers = ["yes\n", " yes", "yes"] + ["yes"] * 7
    assert vqa_accuracy("Yes!", answers) == 1.0
    assert vqa_accuracy("Yes", answers, always_normalize_prediction=False) == 0.0


@pytest.mark.parametrize(
    "answers, expected",
    [
        # Holding out the only answer leaves nothing to match: always 0.
        (["yes"], 0.0),
        # Each held-out answer leaves 2 matches -> 2/3 each.
        (["yes"] * 3, 2 / 3),
        (["yes"] * 4, 1.0),
        (["yes", "no"], 1 / 6),
    ],
)
def test_fewer_than_ten_answers(answers, expected):
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_invalid_answers_rejected():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError):
        vqa_accuracy("yes", "yes")


def test_batch():
    answer_lists = [["yes"] * 10, ["yes"] * 10, ["two", "2", "2", "2"]]
    got = vqa_accuracy_batch(["yes", "no", "2"], answer_lists)
    assert got == pytest.approx([1.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        vqa_accuracy_batch(["yes"], [])


def test_answer_format_metrics_flag_replies_longer_than_every_reference():
    from tasks.vqa_eval import answer_format_metrics
    answers = [["red", "dark red"], ["two"], ["yes"]]
    # "the dark red" normalizes to two words (article dropped): within the longest reference;
    # "white of and a purple" runs past it (4 words after normalization).
    found = answer_format_metrics(["the dark red", "white of and a purple", "yes"], answers)
    assert found["format_failures"] == pytest.approx(100 / 3)
    assert found["answer_words"] == pytest.approx((2 + 4 + 1) / 3)
    assert answer_format_metrics([], []) == {}
