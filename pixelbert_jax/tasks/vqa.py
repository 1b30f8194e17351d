"""VQA fine-tuning: binary cross-entropy on soft scores over the answer vocabulary; official accuracy.

The loss follows the standard implementation (bottom-up-attention / LXMERT / ViLT:
`binary_cross_entropy_with_logits(logits, targets) * num_answers`), i.e. the element-wise BCE summed over
the answers and averaged over the real examples of the batch. The training metric `vqa_score` is the
soft score of the top answer (what the accuracy gives when the vocabulary holds every human answer); the
evaluator computes the official accuracy itself (tasks/vqa_eval.py; our own rule, under its own key, for
questions without exactly 10 answers) and writes the result file `[{"question_id", "answer"}]` the
evaluation server takes.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from pixelbert_jax.data import pipeline
from pixelbert_jax.tasks import eval_loop, vqa_eval

ANSWER_VOCAB_FILE = "answer_vocab.json"
INPUT_KEYS = ("image", "image_mask", "input_ids", "text_mask")


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in INPUT_KEYS}


def per_example(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
  """[B,A] logits and soft targets -> per-example BCE (summed over answers), top answer, its soft score."""
  logits = logits.astype(jnp.float32)
  bce = jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
  answer = jnp.argmax(logits, axis=-1)
  score = jnp.take_along_axis(targets, answer[:, None], axis=-1)[:, 0]
  return {"loss": bce, "answer": answer, "vqa_score": score}


def loss_and_metrics(outputs: dict[str, jax.Array], batch: dict[str, jax.Array], **unused_weights):
  targets = batch["vqa_targets"].astype(jnp.float32)
  if outputs["vqa_logits"].shape != targets.shape:
    raise ValueError(
        f"vqa_logits {outputs['vqa_logits'].shape} and vqa_targets {targets.shape} differ: "
        "config.model.num_answers must equal the answer vocabulary size (0 sets it from the data)"
    )
  mask = batch["example_mask"].astype(jnp.float32)
  ex = per_example(outputs["vqa_logits"], targets)
  n = jnp.sum(mask)
  loss = jnp.sum(ex["loss"] * mask) / jnp.maximum(n, 1.0)
  return loss, {"loss": (loss, jnp.ones(())), "vqa_score": (jnp.sum(ex["vqa_score"] * mask), n)}


def _predict(apply, batch: dict) -> dict:
  logits = apply(**model_inputs(batch))["vqa_logits"]
  out = per_example(logits, batch["vqa_targets"].astype(jnp.float32))
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
  report = vqa_eval.vqa_report(predictions, gt)
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


def evaluate(trainer, state, workdir) -> dict[str, float]:
  """Eval-split predictions -> result file, official accuracy, mean loss and top-answer soft score."""
  cfg = trainer.config
  split = cfg.data.eval_split
  vocab = pipeline.answer_vocab(cfg.data)
  got = eval_loop.collect(
      trainer, state, split, _predict, device_keys=INPUT_KEYS + ("vqa_targets",), host_keys=("question_id",)
  )
  records = result_records(got["question_id"], got["answer"], vocab)
  eval_loop.write_json(epath.Path(workdir) / ANSWER_VOCAB_FILE, list(vocab))  # for predict.py
  eval_loop.write_json(eval_loop.result_path(workdir, "vqa", split, eval_loop.step_of(state), "json"), records)
  metrics = {"loss": float(np.mean(got["loss"])), "vqa_score": float(np.mean(got["vqa_score"]))}
  accuracy = official_metrics(records, pipeline.vqa_ground_truth(cfg.data, split))
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
