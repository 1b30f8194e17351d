"""VQA with any number of human answers per question: our rule for n != 10 (hand-computed cases), the report
that keeps it apart from the official metric (whose own tests are tests/test_vqa_eval.py), training targets
that agree with it, and a tiny fine-tune on a user's file with 1-, 3- and 10-answer questions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixelbert_jax import evaluate, predict, train
from pixelbert_jax.data import vqa_answers
from pixelbert_jax.tasks import vqa, vqa_eval
from tests import own_data_helpers as od
from tests import train_helpers as th
from tests.finetune_helpers import set_key


@pytest.mark.parametrize(
    "prediction,answers,expected",
    [
        # One answer: exact match after the full normalisation, even when the answers all agree (unlike the
        # official metric, which then compares raw strings: its "Two" never matches "2").
        ("Two.", ["2"], 1.0),
        ("Yes", ["yes"], 1.0),
        ("the dog", ["a dog"], 1.0),
        ("cat", ["dog"], 0.0),
        # Two answers: each match is worth 1/2.
        ("red", ["red", "dark red"], 0.5),
        ("red", ["Red", "red."], 1.0),
        # Three or more: each match is worth 1/3, full credit at 3 (as the official metric's min(1, m/3)).
        ("black", ["black", "black", "grey"], 2 / 3),
        ("grey", ["black", "black", "grey"], 1 / 3),
        ("black", ["black"] * 3, 1.0),
        ("2", ["two", "2", "3", "4", "2"], 1.0),
        ("3", ["two", "2", "3", "4", "2"], 1 / 3),
        # More than ten: the same rule.
        ("yes", ["yes"] * 2 + ["no"] * 10, 2 / 3),
    ],
)
def test_custom_accuracy_matches_the_hand_computed_value(prediction, answers, expected):
  assert vqa_eval.custom_question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_custom_accuracy_needs_an_answer():
  with pytest.raises(ValueError, match="at least one human answer"):
    vqa_eval.custom_question_accuracy("yes", [])


def _gt():
  return {
      1: {"answers": ["2"] * 10, "answer_type": "number"},  # official: 1.0
      2: {"answers": ["red"] + ["blue"] * 9, "answer_type": "other"},  # official: 0.3
      3: {"answers": ["Two"], "answer_type": "number"},  # ours: 1.0
      4: {"answers": ["black", "black", "grey"], "answer_type": "other"},  # ours: 1/3
      5: {"answers": [], "answer_type": ""},  # unannotated
  }


PREDICTIONS = {1: "2", 2: "red", 3: "2", 4: "grey", 5: "anything"}


def test_report_keeps_the_official_metric_bit_for_bit_and_scores_the_rest_apart():
  gt = _gt()
  report = vqa_eval.vqa_report(PREDICTIONS, gt)
  ten = {q: gt[q] for q in (1, 2)}
  assert report["official"] == vqa_eval.vqa_accuracy({q: PREDICTIONS[q] for q in ten}, ten)  # exact equality
  assert report["official"]["accuracy"] == pytest.approx((1.0 + 0.3) / 2)
  assert report["custom"]["per_question"] == pytest.approx({3: 1.0, 4: 1 / 3})
  assert report["custom"]["per_answer_type"] == {"number": 100.0, "other": 33.33}
  assert report["all"] == pytest.approx((1.0 + 0.3 + 1.0 + 1 / 3) / 4)
  assert (report["num_official"], report["num_custom"], report["num_unannotated"]) == (2, 2, 1)
  with pytest.raises(ValueError, match=r"question_id \[4\]"):
    vqa_eval.vqa_report({1: "2", 2: "red", 3: "2", 5: "x"}, gt)


def test_metric_keys_for_official_custom_and_mixed_files():
  gt = _gt()
  records = [{"question_id": q, "answer": a} for q, a in PREDICTIONS.items()]
  mixed = vqa_eval.official_metrics(records, gt)
  assert mixed == pytest.approx(
      {
          "vqa_acc": 0.65,
          "vqa_acc/number": 1.0,
          "vqa_acc/other": 0.3,
          "vqa_acc_custom": (1.0 + 1 / 3) / 2,
          "vqa_acc_custom/number": 1.0,
          "vqa_acc_custom/other": 0.3333,
          "vqa_acc_all": (1.0 + 0.3 + 1.0 + 1 / 3) / 4,
          "vqa_num_official": 2.0,
          "vqa_num_custom": 2.0,
      }
  )
  only_ten = vqa_eval.official_metrics(records[:2], gt)
  assert set(only_ten) == {
      "vqa_acc",
      "vqa_acc/number",
      "vqa_acc/other",
      "vqa_acc_all",
      "vqa_num_official",
      "vqa_num_custom",
  }
  assert only_ten["vqa_acc_all"] == only_ten["vqa_acc"] and only_ten["vqa_num_custom"] == 0
  only_ours = vqa_eval.official_metrics(records[2:4], gt)
  assert set(only_ours) == {
      "vqa_acc_custom",
      "vqa_acc_custom/number",
      "vqa_acc_custom/other",
      "vqa_acc_all",
      "vqa_num_official",
      "vqa_num_custom",
  }
  assert only_ours["vqa_acc_all"] == only_ours["vqa_acc_custom"] and only_ours["vqa_num_official"] == 0
  assert vqa_eval.official_metrics(records[4:], gt) == {}  # an unannotated split: the result file only


@pytest.mark.parametrize("n", range(1, 10))
def test_training_target_is_what_the_evaluation_scores(n):
  """For n != 10 answers, the soft target of each answer equals the accuracy of predicting it."""
  for m in range(1, n + 1):
    answers = ["yes"] * m + ["no"] * (n - m)
    target = vqa_answers.soft_targets(answers, {"yes": 0, "no": 1, "maybe": 2})
    assert target[0] == pytest.approx(vqa_eval.custom_question_accuracy("yes", answers), abs=1e-6)
    assert target[1] == pytest.approx(vqa_eval.custom_question_accuracy("no", answers) if m < n else 0.0, abs=1e-6)
    assert target[2] == 0.0
  # One answer is a target of 1, not the 0.3 that one annotator of ten gets.
  np.testing.assert_array_equal(vqa_answers.soft_targets(["yes"], {"yes": 0}), [1.0])
  np.testing.assert_allclose(vqa_answers.soft_targets(["yes"] + ["no"] * 9, {"yes": 0}), [0.3])


def own_vqa_config(manual_dir: str, data_dir: str, vocab_path: str, total_steps: int = 2):
  """The demo VQA fine-tune at test size on a user's jsonl folder; num_answers 0 = the vocabulary's size."""
  config = th.load_config("vqa", "demo")
  overrides = {
      **th.tiny_overrides(data_dir, total_steps),
      "init_from": "",
      "cnn_warm_start.steps": 0,
      "data.name": "jsonl",
      "data.manual_dir": manual_dir,
      "data.vocab_path": vocab_path,
      "data.vqa_min_answer_count": 1,
      "model.num_answers": -1,
      "model.vocab_size": len(open(vocab_path).read().split()),
      "batch_size": 4,
      "eval_batch_size": 4,
      "eval_steps": -1,
  }
  for key, value in overrides.items():
    set_key(config, key, value)
  return config


@pytest.mark.slow
def test_finetune_on_one_and_three_answer_questions_evaluates_and_predicts(tmp_path):
  """The issue's case: a user's file with 1- and 3-answer questions (and a few with 10) fine-tunes, evaluates
  under the documented keys and answers a question; before, the first evaluation raised."""
  manual = od.write_vqa_folder(
      str(tmp_path / "mine"), train_counts=[1, 3, 1, 3, 1, 3, 1, 3], val_counts=[1, 3, 1, 10, 3, 10]
  )
  vocab = od.write_vocab(str(tmp_path / "bert"))
  config = own_vqa_config(manual, str(tmp_path / "tfds"), vocab)
  workdir = tmp_path / "run"
  final = train.train_and_evaluate(config, str(workdir))
  answers = json.loads((workdir / "answer_vocab.json").read_text())
  assert sorted(answers) == sorted(od.COLOURS)  # min count 1: every train answer
  assert json.loads((workdir / "config.json").read_text())["model"]["num_answers"] == len(answers)
  assert (final["eval/vqa_num_official"], final["eval/vqa_num_custom"]) == (2, 4)
  for key in ("eval/vqa_acc", "eval/vqa_acc_custom", "eval/vqa_acc_all", "eval/vqa_acc_custom/unknown"):
    assert 0.0 <= final[key] <= 1.0, key
  mean = (2 * final["eval/vqa_acc"] + 4 * final["eval/vqa_acc_custom"]) / 6
  assert final["eval/vqa_acc_all"] == pytest.approx(mean)
  # The evaluation's own numbers, recomputed from its result file and the val file.
  records = json.loads((workdir / "results" / "vqa_val_step2.json").read_text())
  val = [json.loads(line) for line in (tmp_path / "mine" / "val.jsonl").read_text().splitlines()]
  gt = {i + 1: {"answers": r["answers"]} for i, r in enumerate(val)}  # question_id defaults to the line number
  assert vqa_eval.official_metrics(records, gt)["vqa_acc_custom"] == pytest.approx(final["eval/vqa_acc_custom"])
  logged = [r for r in th.metrics(workdir) if "eval/vqa_acc_custom" in r]
  assert logged and logged[-1]["eval/vqa_acc_custom"] == final["eval/vqa_acc_custom"]
  again = evaluate.evaluate(str(workdir))  # after training, from the workdir alone: the same numbers
  assert again["step"] == 2 and again == pytest.approx({"step": 2, **final}, abs=1e-6)
  top = predict.Predictor(str(workdir)).answer(
      str(tmp_path / "mine" / "images" / "0.jpg"), "what colour is the picture?", top_k=3
  )
  assert len(top) == 3 and all(a in answers for a, _ in top)


def test_a_second_evaluation_rewrites_the_answer_vocab_file(tmp_path):
  """Every VQA evaluation writes WORKDIR/answer_vocab.json; the second one (periodic evaluations,
  `pixelbert_jax.evaluate` after training) must replace it, not fail on it."""
  from pixelbert_jax.tasks import eval_loop

  path = tmp_path / "answer_vocab.json"
  eval_loop.write_json(path, ["a"])
  eval_loop.write_json(path, ["a", "b"])
  assert json.loads(path.read_text()) == ["a", "b"] and [p.name for p in tmp_path.iterdir()] == [path.name]
