"""The official VQA accuracy, answer normalisation included, as GT-Vision-Lab/VQA computes it.

Reference: `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at GT-Vision-Lab/VQA master (commit a013f00,
"Fixed processing answers bug", 2021). Its quirks are kept on purpose, because published numbers depend
on them:
- normalisation (punctuation, lower case, number words, articles, contractions) is applied to the
    prediction *and* the human answers only when the 10 human answers are not all identical; when they all
    agree the raw (stripped) strings are compared, so "Two" does not match ten times "2";
- a punctuation mark is deleted when it touches a space anywhere in the text (or the text holds a
    digit-comma-digit), and replaced by a space otherwise; the apostrophe and the colon are not in the list;
- a period is removed unless a digit follows it (the reference's look-behind is mistyped as a look-ahead),
    and at most 32 periods are removed (it passes `re.UNICODE` as `count`);
- number words map to digits only from "none"/"zero" to "ten", word by word;
- each of the 10 answers is left out in turn: min(1, matches among the other 9 / 3), averaged.

Questions with another number of human answers (your own data: one answer, or three) are outside the
official metric; `custom_question_accuracy` scores them by our own rule, and `vqa_report` keeps the two
kinds apart so that the official number is never mixed with ours:
- the prediction and every human answer get the full normalisation (`normalize`), always; n answers, of
    which `matches` equal the prediction: min(1, matches / min(3, n)). One answer: exact match. Two:
    half credit for one match. Three or more: full credit at three matches, as in the official metric.
- No leave-one-out: with 3 answers, leaving one out would forbid full credit whenever they disagree.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from pixelbert_jax.data.vqa_answers import OFFICIAL_NUM_ANSWERS, custom_score
from pixelbert_jax.tasks import eval_loop, vqa

ANSWER_VOCAB_FILE = "answer_vocab.json"  # beside the checkpoints, for predict.py

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_COUNT = int(re.UNICODE)  # the reference passes re.UNICODE (32) as sub()'s count


def process_punctuation(text: str) -> str:
  out = text
  for p in PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
  words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize(text: str) -> str:
  """The full normalisation (what the reference applies when the human answers disagree)."""
  return process_digit_article(process_punctuation(_clean_whitespace(text)))


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """Official accuracy in [0, 1] of one prediction against the 10 human answers of one question."""
  if len(human_answers) != OFFICIAL_NUM_ANSWERS:
    raise ValueError(
        f"VQA needs {OFFICIAL_NUM_ANSWERS} human answers per question, got {len(human_answers)}: "
        f"{list(human_answers)!r}"
    )
  gts = [_clean_whitespace(a) for a in human_answers]
  pred = _clean_whitespace(prediction)
  if len(set(gts)) > 1:
    gts = [process_digit_article(process_punctuation(a)) for a in gts]
    pred = process_digit_article(process_punctuation(pred))
  matches = [g == pred for g in gts]
  total = sum(matches)
  # Leaving answer i out removes its own match (the reference compares answer dicts, unique by answer_id).
  return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


def custom_question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """Our accuracy in [0, 1] for a question with n >= 1 human answers (any n; `vqa_report` uses it for
  n != 10): min(1, matches / min(3, n)) after the full normalisation of both sides."""
  if not human_answers:
    raise ValueError("a question needs at least one human answer to be scored")
  pred = normalize(prediction)
  matches = sum(normalize(a) == pred for a in human_answers)
  return custom_score(matches, len(human_answers))


def vqa_report(predictions: Mapping[int, str], ground_truth: Mapping[int, dict]) -> dict[str, object]:
  """Any number of human answers per question: questions with exactly 10 get the official metric
  (`vqa_accuracy`, bit for bit), those with another number `custom_question_accuracy`; questions without
  answers (an unannotated test split) are counted, not scored.

  -> {"official": vqa_accuracy(...) of the 10-answer questions or None, "custom": the same keys for the
      others or None, "all": mean over every scored question or None, "num_official", "num_custom",
      "num_unannotated": question counts}."""
  missing = [q for q in ground_truth if q not in predictions]
  if missing:
    raise ValueError(
        f"{len(missing)} of {len(ground_truth)} questions have no prediction, e.g. question_id " f"{missing[:5]}"
    )
  official = {q: gt for q, gt in ground_truth.items() if len(gt["answers"]) == OFFICIAL_NUM_ANSWERS}
  custom = {q: gt for q, gt in ground_truth.items() if len(gt["answers"]) not in (0, OFFICIAL_NUM_ANSWERS)}
  out: dict[str, object] = {
      "official": None,
      "custom": None,
      "all": None,
      "num_official": len(official),
      "num_custom": len(custom),
      "num_unannotated": len(ground_truth) - len(official) - len(custom),
  }
  if official:
    out["official"] = vqa_accuracy({q: predictions[q] for q in official}, official)
  if custom:
    out["custom"] = _accuracy_table(predictions, custom, custom_question_accuracy)
  scores = [r["per_question"][q] for r in (out["official"], out["custom"]) if r for q in r["per_question"]]
  if scores:
    out["all"] = sum(scores) / len(scores)
  return out


def vqa_accuracy(
    predictions: Mapping[int, str],
    ground_truth: Mapping[int, dict],
) -> dict[str, object]:
  """Accuracy over every question of `ground_truth` (question_id -> {answers, answer_type?,
  question_type?}). A question without a prediction is an error, as on the evaluation server.

  -> {"accuracy": mean in [0, 1], "overall": x100 rounded to 2 places (the reference's number),
      "per_answer_type", "per_question_type": x100 rounded, "per_question": {qid: [0, 1]}}."""
  missing = [q for q in ground_truth if q not in predictions]
  if missing:
    raise ValueError(
        f"{len(missing)} of {len(ground_truth)} questions have no prediction, e.g. question_id " f"{missing[:5]}"
    )
  if not ground_truth:
    raise ValueError("no questions to evaluate")
  return _accuracy_table(predictions, ground_truth, question_accuracy)


def _accuracy_table(predictions: Mapping[int, str], ground_truth: Mapping[int, dict], score) -> dict[str, object]:
  """vqa_accuracy's result keys, with `score(prediction, answers)` giving each question's accuracy."""
  per_question, by_answer, by_question = {}, {}, {}
  for qid, gt in ground_truth.items():
    acc = score(predictions[qid], gt["answers"])
    per_question[qid] = acc
    by_answer.setdefault(gt.get("answer_type", ""), []).append(acc)
    by_question.setdefault(gt.get("question_type", ""), []).append(acc)
  return _table(per_question, by_answer, by_question)


def _table(per_question: dict, by_answer: dict, by_question: dict) -> dict[str, object]:
  mean = lambda xs: sum(xs) / len(xs)
  return {
      "accuracy": mean(list(per_question.values())),
      "overall": round(100 * mean(list(per_question.values())), 2),
      "per_answer_type": {k: round(100 * mean(v), 2) for k, v in by_answer.items()},
      "per_question_type": {k: round(100 * mean(v), 2) for k, v in by_question.items()},
      "per_question": per_question,
  }


# ---------------------------------------------------------------------------------------------------------
# The evaluator: predictions over the eval split, the result file and the accuracies


def _predict(apply, batch: dict) -> dict:
  logits = apply(**vqa.model_inputs(batch))["vqa_logits"]
  out = vqa.per_example(logits, batch["vqa_targets"].astype(jnp.float32))
  out["confidence"] = jax.nn.sigmoid(jnp.max(logits, axis=-1))
  return out


def result_records(question_ids: Sequence[int], answer_index: Sequence[int], vocab: Sequence[str]) -> list[dict]:
  """The evaluation server's format: [{"question_id": int, "answer": str}], one per question."""
  if len(set(int(q) for q in question_ids)) != len(question_ids):
    raise ValueError("duplicate question_id in the VQA predictions")
  return [{"question_id": int(q), "answer": vocab[int(a)]} for q, a in zip(question_ids, answer_index)]


def official_metrics(records: Sequence[dict], ground_truth: Mapping[int, dict] | None) -> dict[str, float]:
  """Accuracy of `records` against ground truth (question_id -> {answers, answer_type, ...}), any number of
  human answers per question (vqa_eval.vqa_report), under keys that never mix the two rules:

  - `vqa_acc`, `vqa_acc/<answer type>`: the official metric over the questions with 10 answers (VQA v2);
  - `vqa_acc_custom`, `vqa_acc_custom/<answer type>`: our rule, min(1, matches / min(3, n)), over those with
    n != 10 answers (your own data: one answer, three, ...);
  - `vqa_acc_all`: the mean over both kinds, one number to compare checkpoints by;
  - `vqa_num_official`, `vqa_num_custom`: how many questions each covers (unannotated ones are not scored).
  A kind with no question has no keys."""
  if not ground_truth:
    return {}
  predictions = {r["question_id"]: r["answer"] for r in records}
  gt = {q: ground_truth[q] for q in predictions if q in ground_truth}
  if len(gt) != len(predictions):
    missing = [q for q in predictions if q not in ground_truth][:5]
    raise ValueError(f"{len(predictions) - len(gt)} predicted questions have no ground truth, e.g. {missing}")
  report = vqa_report(predictions, gt)
  out: dict[str, float] = {}
  for name, key in (("official", "vqa_acc"), ("custom", "vqa_acc_custom")):
    result = report[name]
    if result is not None:
      out[key] = float(result["accuracy"])
      out.update({f"{key}/{k or 'unknown'}": v / 100 for k, v in result["per_answer_type"].items()})
  if report["all"] is not None:
    out["vqa_acc_all"] = float(report["all"])
    out["vqa_num_official"] = float(report["num_official"])
    out["vqa_num_custom"] = float(report["num_custom"])
  return out


def evaluate(context, data, state, workdir) -> dict[str, float]:
  """Eval-split predictions -> result file, official accuracy, mean loss and top-answer soft score."""
  split = context.config.data.eval_split
  vocab = data.answer_vocab()
  got = eval_loop.collect(
      context,
      data,
      state,
      split,
      _predict,
      device_keys=vqa.INPUT_KEYS + ("vqa_targets",),
      host_keys=("question_id",),
  )
  records = result_records(got["question_id"], got["answer"], vocab)
  eval_loop.write_json(epath.Path(workdir) / ANSWER_VOCAB_FILE, list(vocab))  # for predict.py
  eval_loop.write_json(eval_loop.result_path(workdir, "vqa", split, eval_loop.step_of(state), "json"), records)
  metrics = {"loss": float(np.mean(got["loss"])), "vqa_score": float(np.mean(got["vqa_score"]))}
  accuracy = official_metrics(records, data.vqa_ground_truth(split))
  if accuracy:
    logging.info(
        "VQA %s: %d questions with 10 answers -> eval/vqa_acc (official metric); %d with another "
        "number -> eval/vqa_acc_custom (min(1, matches / min(3, n))); eval/vqa_acc_all over both",
        split,
        accuracy["vqa_num_official"],
        accuracy["vqa_num_custom"],
    )
  metrics.update(accuracy)
  return {f"eval/{k}": v for k, v in metrics.items()}
