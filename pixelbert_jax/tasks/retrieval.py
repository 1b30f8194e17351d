"""Image-text retrieval fine-tuning: each image against its caption and N captions of other images.

Train batches carry `input_ids`/`text_mask` [B,1+N,L] (caption 0 is the positive). The CNN runs once per
image and its features are shared by the 1+N pairs. The paper fine-tunes only the transformer: the configs
set `model.cnn.frozen=True`, so the CNN runs in inference mode under stop_gradient, with no backward pass
through it, and the optimizer leaves it alone. The loss is the softmax cross-entropy over the positive and
the `hard_negatives` highest-scoring negatives (the paper's "back-propagation through the hardest
negatives"); the easier negatives only take part in choosing them.
Evaluation (tasks/retrieval_eval.py) ranks every caption for every image and back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pixelbert_jax.tasks import specs
from pixelbert_jax.tasks.reduce import masked_mean

IMAGE_KEYS = ("image", "image_mask")


def score_groups(module, image, image_mask, input_ids, text_mask, train: bool = False):
  """Model method: images [B,...] against caption groups [B,G,L] -> {'retrieval_logits': [B,G]}."""
  b, g, length = input_ids.shape
  pixels, pixel_mask = module.encode_image(image, image_mask, train)  # once per image, not per caption
  pixels = jnp.repeat(pixels, g, axis=0)
  pixel_mask = jnp.repeat(pixel_mask, g, axis=0)
  scores = module.score_pixels(
      input_ids.reshape(b * g, length), text_mask.reshape(b * g, length), pixels, pixel_mask, train
  )
  return {"retrieval_logits": scores.reshape(b, g)}


def model_inputs(batch: dict[str, jax.Array]) -> dict:
  """Keyword arguments of `model.apply`: `method` makes the retrieval model score caption groups."""
  if batch["input_ids"].ndim != 3:
    raise ValueError(f"retrieval train batches need input_ids [B,1+N,L], got {batch['input_ids'].shape}")
  return {"method": score_groups, **{k: batch[k] for k in IMAGE_KEYS + ("input_ids", "text_mask")}}


def hard_negative_logits(scores: jax.Array, hard_negatives: int) -> jax.Array:
  """[B,1+N] -> [B,1+k]: the positive (column 0) and the k highest-scoring negatives, with their gradient.

  The softmax runs over these 1+k only. Keeping the other negatives in its denominator as constants (under
  stop_gradient) would break the loss's invariance to a shift of all scores: every step would then push
  the scores that carry gradient up together, against the constants, by as much as it sharpens the
  ranking. Adam normalises that common push to full step size, and the ranking signal drowns in it
  (the retrieval loss then stays at ln(1+N)). k <= 0 or k >= N keeps every negative.
  """
  neg = scores[:, 1:]
  k = int(hard_negatives)
  if k <= 0 or k >= neg.shape[1]:
    return scores
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(neg), k)
  return jnp.concatenate([scores[:, :1], jnp.take_along_axis(neg, idx, axis=1)], axis=1)


def loss_and_metrics(
    outputs: dict[str, jax.Array], batch: dict[str, jax.Array], *, hard_negatives: int = 5, **unused_weights
):
  scores = outputs["retrieval_logits"].astype(jnp.float32)
  if scores.ndim != 2:
    raise ValueError(f"retrieval_logits must be [B,1+N], got {scores.shape}")
  mask = batch["example_mask"].astype(jnp.float32)
  logits = hard_negative_logits(scores, hard_negatives)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(scores.shape[0], jnp.int32))
  loss, n = masked_mean(xent, mask)
  top1 = (jnp.argmax(scores, -1) == 0).astype(jnp.float32)
  return loss, {"loss": (loss, jnp.ones(())), "acc": (jnp.sum(top1 * mask), n)}


def batch_spec(config, batch_size: int, image_hw: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
  """Each image with its caption and `data.retrieval_negatives` others: text [B,1+N,L]."""
  b, group = batch_size, 1 + int(config.data.retrieval_negatives)
  return {**specs.image(b, image_hw), **specs.text((b, group), config.data.max_text_len), **specs.examples(b)}
