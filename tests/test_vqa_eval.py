"""The official VQA accuracy on hand-built tricky answers; every expected value is worked out by hand below.

With m of the 10 human answers matching, leaving each one out gives: for the m matching answers
min(1, (m-1)/3), for the 10-m others min(1, m/3); the question's accuracy is their mean.
"""

from __future__ import annotations

import pytest

from pixelbert_jax.tasks import vqa_eval


def by_hand(m: int) -> float:
  return (m * min(1.0, (m - 1) / 3) + (10 - m) * min(1.0, m / 3)) / 10


@pytest.mark.parametrize(
    "prediction,answers,expected",
    [
        # All 10 agree: the reference compares raw (stripped) strings, no normalisation at all.
        ("2", ["2"] * 10, 1.0),
        (" 2\n", ["2"] * 10, 1.0),
        ("two", ["2"] * 10, 0.0),
        ("Yes", ["yes"] * 10, 0.0),
        # Disagreement: both sides normalised. "Two." -> "two" -> "2"; "two" and "2" both become "2": m = 3.
        ("Two.", ["two"] * 2 + ["2"] + ["3"] * 7, 0.9),
        # Articles dropped: "the dog" and "a dog" are "dog": m = 2.
        ("the dog", ["a dog", "dog"] + ["cat"] * 8, 0.6),
        # Contractions: "dont" -> "don't": m = 2.
        ("Dont", ["dont", "don't"] + ["no"] * 8, 0.6),
        # Apostrophe is not punctuation in the reference: "dog's" never equals "dogs": m = 0.
        ("dog's", ["dogs"] * 2 + ["cat"] * 8, 0.0),
        # digit,digit: commas deleted, "3,000" -> "3000": m = 2.
        ("3,000", ["3000", "3000"] + ["many"] * 8, 0.6),
        # Comma touching no space and no digits around: replaced by a space: "black,white" -> "black white": m = 4.
        ("black,white", ["black white"] * 4 + ["white"] * 6, 1.0),
        # A trailing period goes, a decimal point stays: "2.5." -> "2.5": m = 3.
        ("2.5.", ["2.5"] * 3 + ["3"] * 7, 0.9),
        # Hyphen and case: "T-Shirt" -> "t shirt": m = 2.
        ("T-Shirt", ["t shirt"] * 2 + ["shirt"] * 8, 0.6),
        # "none" and "zero" are 0: m = 3 + 1.
        ("0", ["none"] * 3 + ["zero"] + ["1"] * 6, 1.0),
        # One annotator agrees: 9 of the leave-one-out subsets contain that answer once: 9 * (1/3) / 10.
        ("red", ["red"] + ["blue"] * 9, 0.3),
        # Punctuation touching a space is deleted ("yes !" -> "yes"), otherwise spaced ("yes!" -> "yes").
        ("yes !", ["yes!"] * 3 + ["no"] * 7, 0.9),
    ],
)
def test_question_accuracy_matches_the_hand_computed_value(prediction, answers, expected):
  assert vqa_eval.question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("m", range(11))
def test_leave_one_out_formula(m):
  answers = ["yes"] * m + ["no"] * (10 - m)
  if m == 10:
    assert vqa_eval.question_accuracy("yes", answers) == 1.0
  else:
    assert vqa_eval.question_accuracy("yes", answers) == pytest.approx(by_hand(m), abs=1e-12)


def test_normalisation_steps():
  assert vqa_eval.normalize("  The Three  Dogs. ") == "3 dogs"
  assert vqa_eval.normalize("an apple") == "apple"
  assert vqa_eval.normalize("isnt") == "isn't"
  assert vqa_eval.normalize("ten") == "10"
  assert vqa_eval.normalize("eleven") == "eleven"  # the map stops at ten
  assert vqa_eval.normalize("(left)") == "left"
  # The reference removes at most 32 periods (re.UNICODE passed as `count`).
  assert vqa_eval.process_punctuation("." * 40) == "." * 8


def test_dataset_accuracy_and_breakdowns():
  gt = {
      1: {"answers": ["2"] * 10, "answer_type": "number", "question_type": "how many"},
      2: {"answers": ["a dog", "dog"] + ["cat"] * 8, "answer_type": "other", "question_type": "what"},
      3: {"answers": ["red"] + ["blue"] * 9, "answer_type": "other", "question_type": "what"},
  }
  result = vqa_eval.vqa_accuracy({1: "2", 2: "the dog", 3: "red"}, gt)
  assert result["accuracy"] == pytest.approx((1.0 + 0.6 + 0.3) / 3)
  assert result["overall"] == round(100 * (1.0 + 0.6 + 0.3) / 3, 2) == 63.33
  assert result["per_answer_type"] == {"number": 100.0, "other": 45.0}
  assert result["per_question"][3] == pytest.approx(0.3)


def test_missing_prediction_and_wrong_answer_count_are_errors():
  gt = {7: {"answers": ["yes"] * 10}, 8: {"answers": ["no"] * 10}}
  with pytest.raises(ValueError, match=r"question_id \[8\]"):
    vqa_eval.vqa_accuracy({7: "yes"}, gt)
  with pytest.raises(ValueError, match="10 human answers"):
    vqa_eval.question_accuracy("yes", ["yes"] * 9)
