"""Pre-training evaluation: MLM and ITM metrics summed over the held-out split, and on the synthetic world
the grounded-word probe (a colour or shape word that only the pixels determine, asked with the image's own
pixels and with another image's) and its binding part (the words whose image holds other objects).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pixelbert_jax.data import pipeline
from pixelbert_jax.tasks import eval_loop, pretrain


def evaluate(context, data, state, workdir) -> dict[str, float]:
  """The mean of every metric over `config.data.eval_split` (`config.eval_steps` > 0 caps the batches)."""
  del workdir  # no result file: the metrics are the result
  sums = eval_loop.metric_sums(context, data, state, context.config.data.eval_split, eval_metrics)
  return {f"eval/{k}": v for k, v in summarize_eval(sums).items()}


def eval_metrics(apply, batch: dict[str, jax.Array], config) -> dict[str, Any]:
  """Eval-mode metrics; on the synthetic world also the grounded-word probe (see `grounded_probe`)."""
  weights = dict(config.get("loss", {}))
  _, metrics = pretrain.loss_and_metrics(apply(**pretrain.model_inputs(batch)), batch, **weights)
  if "text_ids" in batch:
    # ITM on the caption as written, as ViLT scores it. On the training's masked text (kept as
    # itm_acc_masked) a masked colour or shape word can make a negative caption indistinguishable.
    metrics["itm_acc_masked"] = metrics["itm_acc"]
    logits = apply(**pretrain.model_inputs({**batch, "input_ids": batch["text_ids"]}))["itm_logits"]
    correct = (jnp.argmax(logits, -1) == batch["itm_label"]).astype(jnp.float32)
    example_mask = batch["example_mask"].astype(jnp.float32)
    metrics["itm_acc"] = (jnp.sum(correct * example_mask), jnp.sum(example_mask))
  if config.data.get("grounded_metric", False):
    mask_id = pipeline.tokenizer(config.data).mask_token_id
    probe, labels, weight = pretrain.grounded_probe(batch, mask_id)
    for name, b in (("mlm_acc_grounded", probe), ("mlm_acc_grounded_shuffled", pretrain.shuffle_images(probe))):
      predictions = jnp.argmax(apply(**pretrain.model_inputs(b))["mlm_logits"], -1)
      correct = (predictions == labels).astype(jnp.float32)
      metrics[name] = (jnp.sum(correct * weight), jnp.sum(weight))
      if name == "mlm_acc_grounded" and "image_colours" in batch:
        metrics.update(
            pretrain.binding(labels, predictions, weight, batch["image_colours"], batch["image_shapes"], b["input_ids"])
        )
    histogram = jnp.zeros((config.model.vocab_size,), jnp.float32)
    metrics["grounded_label_histogram"] = histogram.at[labels.reshape(-1)].add(weight.reshape(-1))
  return metrics


def summarize_eval(sums: dict[str, Any]) -> dict[str, float]:
  out = {k: float(v[0] / max(v[1], 1e-9)) for k, v in sums.items() if isinstance(v, tuple)}
  if "grounded_label_histogram" in sums:
    h = sums["grounded_label_histogram"]
    out["mlm_grounded_majority_rate"] = float(h.max() / max(h.sum(), 1e-9))
  return out
