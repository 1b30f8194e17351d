"""The pre-training loss and the grounded-word probe on hand-built batches."""

import jax.numpy as jnp
import numpy as np

import pytest
from pixelbert_jax.tasks import pretrain, pretrain_eval

MASK = 4


def _batch():
  # Example 0: matched, "[CLS] a red(g) circle(g) [SEP]" with "circle" masked by the data pipeline.
  # Example 1: matched but padding (example_mask 0). Example 2: an ITM negative.
  ids = np.array([[1, 10, 20, MASK, 2, 0], [1, 10, 21, 31, 2, 0], [1, 10, 22, 32, 2, 0]], np.int32)
  labels = np.zeros_like(ids)
  labels[0, 3] = 30
  weights = np.zeros(ids.shape, np.float32)
  weights[0, 3] = 1
  grounded = np.zeros(ids.shape, np.float32)
  grounded[:, 2:4] = 1
  return {
      "input_ids": jnp.asarray(ids),
      "text_mask": jnp.asarray((ids > 0).astype(np.int32)),
      "mlm_labels": jnp.asarray(labels),
      "mlm_weights": jnp.asarray(weights),
      "mlm_grounded": jnp.asarray(grounded),
      "itm_label": jnp.asarray([1, 1, 0], jnp.int32),
      "example_mask": jnp.asarray([1, 0, 1], jnp.float32),
      "image": jnp.arange(3 * 4, dtype=jnp.uint8).reshape(3, 2, 2, 1).repeat(3, -1),
      "image_mask": jnp.ones((3, 2, 2), bool),
  }


def test_probe_asks_one_grounded_word_of_each_real_matched_caption():
  b = _batch()
  probe, original, weight = pretrain.grounded_probe(b, MASK)
  np.testing.assert_array_equal(original[0], [1, 10, 20, 30, 2, 0])  # the pipeline's mask is undone
  assert float(weight[0].sum()) == 1 and float(weight[1:].sum()) == 0  # padding and negatives not asked
  pos = int(jnp.argmax(weight[0]))
  assert pos in (2, 3)
  expected = np.array([1, 10, 20, 30, 2, 0])
  expected[pos] = MASK
  np.testing.assert_array_equal(probe["input_ids"][0], expected)
  again = pretrain.grounded_probe(b, MASK)[2]
  np.testing.assert_array_equal(again, weight)  # the same question at every evaluation


def test_shuffle_images_pairs_each_caption_with_another_image():
  b = _batch()
  s = pretrain.shuffle_images(b)
  np.testing.assert_array_equal(s["image"][1], b["image"][0])
  np.testing.assert_array_equal(s["input_ids"], b["input_ids"])


@pytest.mark.slow
def test_losses_count_only_masked_tokens_and_real_examples():
  b = _batch()
  vocab = 40
  mlm_logits = jnp.zeros((3, 6, vocab)).at[0, 3, 30].set(10.0)  # right where asked
  itm_logits = jnp.asarray([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])  # example 2 is wrong, 1 is padding
  loss, m = pretrain.loss_and_metrics({"mlm_logits": mlm_logits, "itm_logits": itm_logits}, b)
  assert float(m["mlm_acc"][0]) == 1 and float(m["mlm_acc"][1]) == 1
  assert float(m["itm_acc"][0]) == 1 and float(m["itm_acc"][1]) == 2
  expected_itm = (np.log1p(np.exp(-5.0)) + np.log1p(np.exp(5.0))) / 2
  np.testing.assert_allclose(float(m["itm_loss"][0]), expected_itm, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(m["mlm_loss"][0]) + expected_itm, rtol=1e-5)
  assert float(m["mlm_acc_grounded"][1]) == 1  # "circle" is grounded


def test_summarize_eval_majority_rate():
  hist = np.zeros(10)
  hist[[3, 5]] = [3, 1]
  out = pretrain_eval.summarize_eval({"mlm_acc_grounded": (2.0, 4.0), "grounded_label_histogram": hist})
  assert out == {"mlm_acc_grounded": 0.5, "mlm_grounded_majority_rate": 0.75}


def test_eval_itm_reads_the_caption_as_written():
  """`itm_acc` scores ITM on `text_ids` (unmasked), `itm_acc_masked` on the masked input_ids."""
  import ml_collections

  batch = _batch()
  batch["text_ids"] = batch["input_ids"].at[0, 3].set(30)  # the caption before masking

  def apply(image, image_mask, input_ids, text_mask):
    # right (logit for the true label) on unmasked text, wrong on masked text
    masked = jnp.any(input_ids == MASK, axis=1)
    right = jnp.stack([1 - batch["itm_label"], batch["itm_label"]], -1).astype(jnp.float32)
    itm = jnp.where(masked[:, None], 1.0 - right, right)
    return {"itm_logits": itm, "mlm_logits": jnp.zeros(input_ids.shape + (40,))}

  config = ml_collections.ConfigDict(dict(loss={}, data=dict(grounded_metric=False)))
  m = pretrain_eval.eval_metrics(apply, batch, config)
  np.testing.assert_allclose([m["itm_acc"][0], m["itm_acc"][1]], [2, 2])  # both real examples right
  np.testing.assert_allclose([m["itm_acc_masked"][0], m["itm_acc_masked"][1]], [1, 2])  # example 0 masked
