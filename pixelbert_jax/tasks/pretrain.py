"""Pre-training objective: masked language modelling conditioned on pixels + image-text matching.

Losses are means over what was really selected (masked tokens of matched pairs for MLM, real examples for
ITM), so padding examples of an eval batch and unmasked tokens contribute nothing. Metrics are returned as
(sum, count) pairs so that they can be summed across steps and batches and divided once.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from pixelbert_jax.tasks import specs
from pixelbert_jax.tasks.reduce import masked_mean

INPUT_KEYS = ("image", "image_mask", "input_ids", "text_mask")
# a frozen CNN's features cached per image (feature_cache.py), which batches carry in place of the image
CACHED_KEYS = ("c5", "pixel_mask")
MetricSums = dict[str, tuple[jax.Array, jax.Array]]


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  if "c5" in batch:
    return {"image": None, "image_mask": None, **{k: batch[k] for k in INPUT_KEYS[2:] + CACHED_KEYS}}
  return {k: batch[k] for k in INPUT_KEYS}


def loss_and_metrics(
    outputs: dict[str, jax.Array], batch: dict[str, jax.Array], *, mlm_weight: float = 1.0, itm_weight: float = 1.0
) -> tuple[jax.Array, MetricSums]:
  mlm_logits = outputs["mlm_logits"].astype(jnp.float32)
  itm_logits = outputs["itm_logits"].astype(jnp.float32)
  example_mask = batch["example_mask"].astype(jnp.float32)

  mlm_w = batch["mlm_weights"].astype(jnp.float32) * example_mask[:, None]
  mlm_xent = optax.softmax_cross_entropy_with_integer_labels(mlm_logits, batch["mlm_labels"])
  mlm_loss, mlm_n = masked_mean(mlm_xent, mlm_w)
  mlm_correct = (jnp.argmax(mlm_logits, -1) == batch["mlm_labels"]).astype(jnp.float32)

  itm_xent = optax.softmax_cross_entropy_with_integer_labels(itm_logits, batch["itm_label"])
  itm_loss, itm_n = masked_mean(itm_xent, example_mask)
  itm_correct = (jnp.argmax(itm_logits, -1) == batch["itm_label"]).astype(jnp.float32)

  loss = mlm_weight * mlm_loss + itm_weight * itm_loss
  metrics = {
      "loss": (loss, jnp.ones(())),
      "mlm_loss": (mlm_loss, jnp.ones(())),
      "itm_loss": (itm_loss, jnp.ones(())),
      "mlm_acc": (jnp.sum(mlm_correct * mlm_w), mlm_n),
      "itm_acc": (jnp.sum(itm_correct * example_mask), itm_n),
  }
  if "mlm_grounded" in batch:
    g = mlm_w * batch["mlm_grounded"].astype(jnp.float32)
    metrics["mlm_acc_grounded"] = (jnp.sum(mlm_correct * g), jnp.sum(g))
  return loss, metrics


def grounded_probe(
    batch: dict[str, jax.Array],
    mask_token_id: int,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """The original caption of every matched pair with exactly one grounded word replaced by [MASK].

  With 15% random masking only a few grounded words are masked per eval pass, too few for a stable
  number; the probe asks every matched caption for one of its colour/shape words, the rest of the
  caption intact, so the only way to answer is to read the pixels. Which grounded word is asked is a
  fixed pseudo-random choice, so the probe is the same at every evaluation. Returns the probe batch,
  the labels [B,L] and the weights [B,L] (1 at the asked position of matched real examples).
  """
  original = jnp.where(batch["mlm_weights"] > 0, batch["mlm_labels"], batch["input_ids"])
  grounded = (batch["mlm_grounded"] > 0) & (batch["text_mask"] > 0)
  noise = jax.random.uniform(jax.random.PRNGKey(0), grounded.shape)
  pick = jnp.argmax(jnp.where(grounded, noise, -1.0), axis=-1)
  asked = jax.nn.one_hot(pick, grounded.shape[1], dtype=jnp.bool_) & grounded
  usable = (batch["itm_label"] == 1) & (batch["example_mask"] > 0)
  weight = (asked & usable[:, None]).astype(jnp.float32)
  probe = {**batch, "input_ids": jnp.where(weight > 0, mask_token_id, original)}
  return probe, original, weight


def binding(
    labels: jax.Array,
    predictions: jax.Array,
    weight: jax.Array,
    colours: jax.Array,
    shapes: jax.Array,
    input_ids: jax.Array,
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """The grounded-word probe on the words that need binding: a colour or shape word whose image holds
  another object that would give a different answer (every other object: colours and shapes are distinct
  within a scene), so reading "which colours are present" is not enough, only "which colour is the star's".

  labels / predictions int [B,L] (the asked word, the model's argmax), weight [B,L] (the probe's asked
  positions); colours / shapes int [B,N]: token ids of the image's colour and shape words, -1 padded;
  input_ids int [B,L]: the text the model was given.
  -> (sum, count) of:
  - mlm_acc_binding: accuracy on those words;
  - mlm_acc_binding_unnamed: accuracy on those of them whose image holds another object of a different
    value that the text does not name. Where the text names every other object ("a [MASK] star is to the
    left of a green ring" in a two-object image), "present but not named" answers without binding;
  - mlm_binding_other_rate: how often the prediction is another object's value (binding to the wrong one);
  - mlm_binding_other_chance: that rate for a guess among the image's values of the word's kind, (n-1)/n.
  """
  is_colour = jnp.any(colours[:, None, :] == labels[..., None], axis=-1)  # [B,L]
  values = jnp.where(is_colour[..., None], colours[:, None, :], shapes[:, None, :])  # [B,L,N]
  other = (values >= 0) & (values != labels[..., None])
  named = jnp.any(values[..., None] == input_ids[:, None, None, :], axis=-1)  # [B,L,N]: the text has it
  n_other = jnp.sum(other, axis=-1).astype(jnp.float32)
  w = weight * (n_other > 0)
  w_unnamed = weight * jnp.any(other & ~named, axis=-1)
  correct = (predictions == labels).astype(jnp.float32)
  wrong_object = jnp.any(other & (values == predictions[..., None]), axis=-1).astype(jnp.float32)
  count = jnp.sum(w)
  return {
      "mlm_acc_binding": (jnp.sum(correct * w), count),
      "mlm_acc_binding_unnamed": (jnp.sum(correct * w_unnamed), jnp.sum(w_unnamed)),
      "mlm_binding_other_rate": (jnp.sum(wrong_object * w), count),
      "mlm_binding_other_chance": (jnp.sum(n_other / (n_other + 1.0) * w), count),
  }


def shuffle_images(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Pairs every caption with the next example's image (a derangement for batches larger than one)."""
  keys = CACHED_KEYS if "c5" in batch else INPUT_KEYS[:2]
  return {**batch, **{k: jnp.roll(batch[k], 1, axis=0) for k in keys}}


def batch_spec(config, batch_size: int, image_hw: tuple[int, int]) -> dict[str, jax.ShapeDtypeStruct]:
  b, length = batch_size, config.data.max_text_len
  out = {**specs.image(b, image_hw), **specs.text((b,), length), **specs.examples(b)}
  out.update(
      mlm_labels=specs.struct((b, length), jnp.int32),
      mlm_weights=specs.struct((b, length), jnp.float32),
      itm_label=specs.struct((b,), jnp.int32),
  )
  return out
