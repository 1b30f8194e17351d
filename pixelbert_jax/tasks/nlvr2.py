"""NLVR2 fine-tuning: two passes (left image, sentence) and (right image, sentence), concatenated [CLS]
vectors -> true/false, cross-entropy. Evaluation (accuracy, consistency, result CSV): tasks/nlvr2_eval.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pixelbert_jax.tasks import specs
from pixelbert_jax.tasks.reduce import masked_mean

INPUT_KEYS = ("image", "image_mask", "input_ids", "text_mask", "image1", "image1_mask")


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: batch[k] for k in INPUT_KEYS}


def loss_and_metrics(outputs: dict[str, jax.Array], batch: dict[str, jax.Array], **unused_weights):
  logits = outputs["nlvr2_logits"].astype(jnp.float32)
  mask = batch["example_mask"].astype(jnp.float32)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  loss, n = masked_mean(xent, mask)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return loss, {"loss": (loss, jnp.ones(())), "acc": (jnp.sum(correct * mask), n)}


def batch_spec(config, batch_size: int, image_hw: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
  b = batch_size
  out = {**specs.image(b, image_hw), **specs.image(b, image_hw, "1"), **specs.examples(b)}
  out.update(specs.text((b,), config.data.max_text_len), label=specs.struct((b,), jnp.int32))
  return out
