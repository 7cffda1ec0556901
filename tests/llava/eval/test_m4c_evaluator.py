"""EvalAI answer normalisation and the TextVQA soft accuracy (upstream's m4c_evaluator)."""

from __future__ import annotations

import pytest

from llava.eval.io import EvalInputError
from llava.eval.m4c_evaluator import (
    CONTRACTIONS,
    EvalAIAnswerProcessor,
    TextVQAAccuracyEvaluator,
    process_punctuation,
    soft_scores,
)


@pytest.fixture(scope="module")
def normalise():
    return EvalAIAnswerProcessor()


@pytest.mark.parametrize(
    "raw, expected",
    [
        # contractions
        ("dont", "don't"),
        ("Dont", "don't"),
        ("isnt it", "isn't it"),
        ("youre", "you're"),
        ("couldnt've", "couldn't've"),
        ("somebody'd", "somebodyd"),  # the table maps this one backwards
        ("Im", "im"),  # capitalised keys never match the lower-cased text
        ("whats", "what's"),
        ("what's", "what 's"),  # "'s" is split off before the table is looked up
        ("dog's bowl", "dog 's bowl"),
        # number words
        ("two", "2"),
        ("Two dogs", "2 dogs"),
        ("none", "0"),
        ("zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        # articles
        ("a dog", "dog"),
        ("An apple", "apple"),
        ("the cat", "cat"),
        ("The End of the road", "end of road"),
        ("theater", "theater"),
        # punctuation
        ("yes?", "yes"),
        ("hello!", "hello"),
        ("yes-no", "yes no"),  # no space next to "-": it becomes a space
        ("yes - no", "yes no"),
        ("x-y -z", "xy z"),  # one "-" next to a space: every "-" is deleted
        ("black/white", "black white"),
        ("(left)", "left"),
        ('"stop"', "stop"),
        ("10:30", "10:30"),  # ":" is not in the list
        ("rock'n'roll", "rock'n'roll"),  # neither is "'"
        ("1,000", "1000"),  # commas go first
        ("red, white", "red white"),
        # periods
        ("3.5", "3.5"),
        ("end.", "end"),
        ("e.g.", "eg"),
        ("1.5.", "1.5"),
        ("$2.50", "$2.50"),
        # whitespace
        ("red\tblue\nGreen ", "red blue green"),
        ("  many   spaces  ", "many spaces"),
    ],
)
def test_evalai_answer_processor(normalise, raw, expected):
    assert normalise(raw) == expected


def test_at_most_32_periods_are_removed(normalise):
    # Upstream passes re.UNICODE (32) where re.sub takes its count.
    assert normalise("." * 40) == "." * 8
    assert normalise("a." * 33) == "a" * 32 + "a."


def test_digit_comma_rule_of_process_punctuation():
    # Without a digit,digit comma, unspaced marks become spaces and spaced ones vanish.
    assert process_punctuation("a,b (c)") == "a b c "
    # With one, every mark vanishes.
    assert process_punctuation("1,000 (c)") == "1000 c"


def test_contraction_table_size():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["wont"] == "won't" and CONTRACTIONS["yall'd've"] == "y'all'd've"


@pytest.mark.parametrize(
    "humans, candidate, expected",
    [
        (["dog"] * 10, "dog", 1.0),
        (["dog"] * 4 + ["cat"] * 6, "dog", 1.0),
        # 3 copies: leaving out a copy leaves 2 (2/3), leaving out another answer leaves 3 (1).
        # (Dropping every copy of the held-out answer would give 0.7 instead.)
        (["dog"] * 3 + ["cat"] * 7, "dog", 0.9),
        (["dog"] * 2 + ["cat"] * 8, "dog", 0.6),
        (["dog"] + ["cat"] * 9, "dog", 0.3),
    ],
)
def test_soft_scores_leave_one_position_out(humans, candidate, expected):
    assert soft_scores(humans)[candidate] == pytest.approx(expected, abs=1e-12)


def test_textvqa_evaluator_hand_computed():
    evaluator = TextVQAAccuracyEvaluator()
    predictions = [
        {"pred_answer": "Dog.", "gt_answers": ["dog"] * 3 + ["cat"] * 7},  # 0.9
        {"pred_answer": "Two Dogs", "gt_answers": ["2 dogs"] * 10},  # 1.0 after normalisation
        {"pred_answer": "the cat", "gt_answers": ["Cat"] + ["dog"] * 9},  # 0.3
        {"pred_answer": "bird", "gt_answers": ["cat"] * 10},  # 0.0
    ]
    assert evaluator.eval_pred_list(predictions) == pytest.approx((0.9 + 1.0 + 0.3 + 0.0) / 4, abs=1e-12)


def test_textvqa_evaluator_needs_ten_answers_and_some_predictions():
    evaluator = TextVQAAccuracyEvaluator()
    with pytest.raises(EvalInputError, match="expected 10 human answers"):
        evaluator.eval_pred_list([{"pred_answer": "a", "gt_answers": ["a"] * 9}])
    with pytest.raises(EvalInputError, match="no predictions"):
        evaluator.eval_pred_list([])
