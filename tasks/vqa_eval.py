"""VQA accuracy with the official VQAv2 answer normalization and 10-answer rule.

The rule (GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``):

* An answer string is normalized in three steps: whitespace cleanup,
  punctuation handling (``processPunctuation``), then lowercasing, number
  words -> digits, article removal and contraction repair
  (``processDigitArticle``). See :func:`normalize_answer`.
* A question has N human answers (10 for VQAv2 and VizWiz). Each human answer
  is held out in turn; the prediction scores ``min(1, matches / 3)`` against
  the remaining N - 1 answers, and the question's accuracy is the mean of those
  N scores. With 10 answers, 4+ matching humans give 1.0 while exactly 3
  give 0.9 (the held-out matching answers leave only 2 matches).
* The human answers are only normalized when they are not all identical
  (``len(set(gtAnswers)) > 1``); a unanimous set is compared verbatim.

Departures from the official script are opt-in or documented where they occur.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Characters handled by processPunctuation. Note that '.', ':' and "'" are not
# here: periods get their own regex and apostrophes must survive for the
# contractions table to be meaningful.
_PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
]

# A thousands separator such as "1,000". If the text contains one anywhere,
# the official code deletes (rather than space-replaces) every punctuation
# char, so "1,000" becomes "1000" instead of "1 000".
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)", re.UNICODE)

# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group was meant as a
# look-behind but "(?!<=\d)" is a negative look-ahead for the literal "<="
# followed by a digit, which can never match where the next char is '.'. The
# net effect: remove every period not followed by a digit ("2." -> "2",
# "3.5" kept). We keep the pattern verbatim so results match byte for byte.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.UNICODE)

# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands
# in the positional *count* argument, and re.UNICODE == 32, so at most 32
# periods are removed. Reproduced so long, many-sentence generations score
# exactly as the official script would score them.
_OFFICIAL_PERIOD_SUB_COUNT = int(re.UNICODE)

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# The official contractions table (as of the commit that switched it to
# straight apostrophes). Lookups happen after lowercasing, so the few keys
# with capitals ("Im", "Ive", "Id've", "I'dve") can never match; they are kept
# for parity, as is the official reversed entry "somebody'd" -> "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def _clean_whitespace(text: str) -> str:
    # Only '\n' and '\t' are mapped, as in the official script; strip() then
    # removes any other leading/trailing whitespace.
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCTUATION:
        # The test looks at the *input* text, not the partly processed one:
        # punctuation next to a space is just noise and is deleted, while
        # punctuation inside a token ("hot-dog") separates words.
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_SUB_COUNT)


def _process_digit_article(text: str) -> str:
    words = []
    # split() with no argument also collapses runs of spaces, so the final
    # join gives single spaces.
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(word)
    # Contractions are looked up after number mapping and article removal,
    # matching the official two-pass order.
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Normalize an answer exactly as the official VQAv2 evaluation does.

    >>> normalize_answer("The Two dogs!")
    '2 dogs'
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(
    prediction: str,
    answers: Sequence[str],
    *,
    always_normalize_prediction: bool = True,
) -> float:
    """Official VQA accuracy of one prediction against its human answers.

    Each human answer is held out in turn and the prediction scores
    ``min(1, matches_among_the_rest / 3)``; the result is the mean.

    With a single human answer, holding it out leaves nothing to match, so
    the score is always 0.0 -- this is what the official loop computes, and it
    is kept rather than special-cased so that scores stay comparable.

    ``always_normalize_prediction`` (default True, as most VLM harnesses do)
    normalizes the prediction even when the human answers are unanimous. The
    current official script only normalizes the prediction together with the
    answers, i.e. when they are not all identical; pass False for that.
    """
    if isinstance(answers, str):
        # A bare string would silently be treated as a list of characters.
        raise TypeError("answers must be a sequence of strings, not a str")
    if len(answers) == 0:
        raise ValueError("answers must contain at least one human answer")

    pred = _clean_whitespace(prediction)
    # The official script strips whitespace from the human answers before the
    # "all identical?" test, so " yes" and "yes" count as identical.
    gts = [_clean_whitespace(a) for a in answers]
    unanimous = len(set(gts)) == 1
    if not unanimous:
        gts = [normalize_answer(a) for a in gts]
    if always_normalize_prediction or not unanimous:
        pred = normalize_answer(pred)

    # Holding out answer i removes exactly one entry, so the matches among the
    # others are the total matches minus one if answer i itself matched.
    total_matches = sum(gt == pred for gt in gts)
    per_holdout = [min(1.0, (total_matches - (gt == pred)) / 3) for gt in gts]
    return sum(per_holdout) / len(per_holdout)


def vqa_accuracy_batch(
    predictions: Sequence[str],
    answer_lists: Sequence[Sequence[str]],
    *,
    always_normalize_prediction: bool = True,
) -> list[float]:
    """Apply :func:`vqa_accuracy` element-wise; lengths must match."""
    if len(predictions) != len(answer_lists):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(answer_lists)} answer lists"
        )
    return [
        vqa_accuracy(p, a, always_normalize_prediction=always_normalize_prediction)
        for p, a in zip(predictions, answer_lists)
    ]


def answer_format_metrics(predictions: Sequence[str], answer_lists: Sequence[Sequence[str]]) -> dict[str, float]:
    """Why a VQA score moved, beside it: `format_failures`, the share (in %) of predictions longer
    in words (normalized) than the longest reference answer of the evaluated samples (a reply
    that ran past the answer: "white of and a purple"), and `answer_words`, their mean length."""
    def words(text: str) -> int:
        return len(normalize_answer(text).split())

    longest = max((words(answer) for answers in answer_lists for answer in answers), default=0)
    lengths = [words(p) for p in predictions]
    if not lengths:
        return {}
    return {"format_failures": 100.0 * sum(n > longest for n in lengths) / len(lengths),
            "answer_words": sum(lengths) / len(lengths)}
