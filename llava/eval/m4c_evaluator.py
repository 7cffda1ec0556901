"""EvalAI answer normalisation and the TextVQA soft accuracy, as upstream LLaVA scores them.

Behaviour reproduced from upstream LLaVA's ``llava/eval/m4c_evaluator.py`` (itself taken from
MMF/Pythia) and the official VQA evaluation code, including their quirks:

- ``'s`` is split off into its own word (``"dog's"`` -> ``"dog 's"``), commas and ``?`` are
  dropped first, so the "digit,digit" punctuation rule never fires inside the processor;
- a listed punctuation mark is deleted when the *original* text has it next to a space (or
  holds a digit,digit comma), otherwise it becomes a space; ``'``, ``:``, ``.`` and others
  are not in the list;
- a period not followed by a digit is removed, but at most 32 of them (upstream passes
  ``re.UNICODE`` where ``re.sub`` expects a count);
- number words up to ten become digits ("none" -> "0"), articles go, contraction spellings
  are fixed; the table's capitalised keys ("Im", "Ive") never match lower-cased text;
- the soft accuracy leaves out one human answer *position* at a time (not every copy of it):
  ``mean_i min(1, #{j != i : gt_j == pred} / 3)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from re import Pattern

from llava.eval.io import EvalInputError

__all__ = [
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "ARTICLES",
    "PUNCTUATION",
    "EvalAIAnswerProcessor",
    "TextVQAAccuracyEvaluator",
    "process_punctuation",
    "process_digit_article",
    "soft_scores",
]

# Misspelling -> spelling, as in the VQA/EvalAI table (oddities such as "somebody'd" ->
# "somebodyd" and the capitalised keys are theirs, kept for identical results).
_CONTRACTION_TABLE = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't
couldn'tve couldn't've | couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't
hadnt hadn't | hadnt've hadn't've | hadn'tve hadn't've | hasnt hasn't | havent haven't
hed he'd | hed've he'd've | he'dve he'd've | hes he's | howd how'd | howll how'll | hows how's
Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd | itd've it'd've
it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't | mightnt've mightn't've
mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've | neednt needn't
notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's
shouldve should've | shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've
somebody'd somebodyd | somebodyd've somebody'd've | somebody'dve somebody'd've
somebodyll somebody'll | somebodys somebody's | someoned someone'd | someoned've someone'd've
someone'dve someone'd've | someonell someone'll | someones someone's | somethingd something'd
somethingd've something'd've | something'dve something'd've | somethingll something'll
thats that's | thered there'd | thered've there'd've | there'dve there'd've | therere there're
theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've
weve we've | werent weren't | whatll what'll | whatre what're | whats what's | whatve what've
whens when's | whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've
who'dve who'd've | wholl who'll | whos who's | whove who've | whyll why'll | whyre why're
whys why's | wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've
y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd | youd've you'd've | you'dve you'd've
youll you'll | youre you're | youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split() for line in _CONTRACTION_TABLE.strip().splitlines() for pair in line.split("|")
)
_NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBER_WORDS: dict[str, str] = {"none": "0", **{word: str(value) for value, word in enumerate(_NUMBER_NAMES)}}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# A comma between digits ("1,000") makes every punctuation mark vanish instead of becoming a space.
M4C_DIGIT_COMMA: Pattern[str] = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32


def process_punctuation(text: str, digit_comma: Pattern[str] = M4C_DIGIT_COMMA) -> str:
    """Delete or space out punctuation, then drop periods that do not precede a digit."""
    delete_all = digit_comma.search(text) is not None
    result = text
    for mark in PUNCTUATION:
        # The test looks at the original text, not at what earlier marks left.
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Lower-case, number words -> digits, drop articles, fix contraction spellings."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


class EvalAIAnswerProcessor:
    """Normalises a free-text answer the way EvalAI's VQA/TextVQA servers do."""

    def __call__(self, answer: str) -> str:
        text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
        text = text.replace("\n", " ").replace("\t", " ").strip()
        return process_digit_article(process_punctuation(text))


def soft_scores(answers: Iterable[str]) -> dict[str, float]:
    """VQA soft accuracy of every distinct (already normalised) human answer.

    Each of the n positions is left out in turn; an answer earns min(1, matches among the
    other n - 1 / 3) and the n values are averaged.
    """
    answers = list(answers)
    scores = {}
    for candidate in set(answers):
        copies = answers.count(candidate)
        # Summed position by position (not in closed form) so floats round as upstream's do.
        per_position = [min(1, (copies - (answer == candidate)) / 3) for answer in answers]
        scores[candidate] = sum(per_position) / len(per_position)
    return scores


class TextVQAAccuracyEvaluator:
    """Mean soft accuracy of predictions against 10 human answers each (upstream's m4c)."""

    def __init__(self) -> None:
        self.answer_processor = EvalAIAnswerProcessor()

    def answer_scores(self, raw_answers: list[str]) -> dict[str, float]:
        if len(raw_answers) != 10:
            raise EvalInputError(f"expected 10 human answers, got {len(raw_answers)}: {raw_answers}")
        return soft_scores(self.answer_processor(a) for a in raw_answers)

    def score(self, pred_answer: str, gt_answers: list[str]) -> float:
        return self.answer_scores(gt_answers).get(self.answer_processor(pred_answer), 0.0)

    def eval_pred_list(self, pred_list: list[dict]) -> float:
        """Mean accuracy over ``{"pred_answer", "gt_answers"}`` entries, in [0, 1]."""
        if not pred_list:
            raise EvalInputError("no predictions to evaluate")
        return sum(self.score(entry["pred_answer"], entry["gt_answers"]) for entry in pred_list) / len(pred_list)
