"""VQA fine-tuning: binary cross-entropy on soft scores over the answer vocabulary; official accuracy.

The loss follows the standard implementation (bottom-up-attention / LXMERT / ViLT:
`binary_cross_entropy_with_logits(logits, targets) * num_answers`), i.e. the element-wise BCE summed over
the answers and averaged over the real examples of the batch. The training metric `vqa_score` is the
soft score of the top answer (what the accuracy gives when the vocabulary holds every human answer); the
official accuracy and the result file are the evaluator's (tasks/vqa_eval.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pixelbert_jax.tasks import specs
from pixelbert_jax.tasks.reduce import masked_mean

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
        "config.model.num_answers must equal the answer vocabulary size (-1 sets it from the data)"
    )
  mask = batch["example_mask"].astype(jnp.float32)
  ex = per_example(outputs["vqa_logits"], targets)
  loss, n = masked_mean(ex["loss"], mask)
  return loss, {"loss": (loss, jnp.ones(())), "vqa_score": (jnp.sum(ex["vqa_score"] * mask), n)}


def batch_spec(config, batch_size: int, image_hw: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
  b = batch_size
  out = {**specs.image(b, image_hw), **specs.text((b,), config.data.max_text_len), **specs.examples(b)}
  out["vqa_targets"] = specs.struct((b, config.model.num_answers), jnp.float32)
  return out
