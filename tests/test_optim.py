"""The optimizer reproduces the paper's recipe: which parameters get SGD vs AdamW, decay, schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pixelbert_jax import optim


def _config(**over):
  o = dict(
      cnn=dict(lr=1e-2, momentum=0.9, weight_decay=5e-4),
      transformer=dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=1e-2),
      warmup_steps=10,
      decay_epochs=(25.0, 35.0),
      decay_factor=0.1,
      grad_clip_norm=0.0,
      grad_accum_steps=1,
  )
  o.update(over)
  return ml_collections.ConfigDict(dict(optim=o, model=dict(cnn=dict(frozen=False))))


def _params():
  return {
      "encoder": {
          "cnn": {
              "conv1": {"kernel": jnp.ones((3, 3, 3, 4))},
              "bn1": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
          },
          "bert": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}},
      },
      "itm_head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones((2,))},
  }


def test_schedule_warmup_then_step_decay():
  s = optim.schedule(1.0, warmup_steps=10, decay_steps=[100, 200], decay_factor=0.1)
  np.testing.assert_allclose(
      [s(0), s(5), s(10), s(99), s(100), s(199), s(200), s(10_000)],
      [0.0, 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01],
      rtol=1e-6,
  )


def test_labels_and_decay_mask():
  p = _params()
  labels = optim.param_labels(p, freeze_cnn=False)
  assert labels["encoder"]["cnn"]["conv1"]["kernel"] == "cnn"
  assert labels["encoder"]["bert"]["dense"]["kernel"] == "transformer"
  assert labels["itm_head"]["bias"] == "transformer"
  assert optim.param_labels(p, freeze_cnn=True)["encoder"]["cnn"]["bn1"]["scale"] == "frozen"
  mask = optim.decay_mask(p)
  assert mask["encoder"]["cnn"]["conv1"]["kernel"] and mask["encoder"]["bert"]["dense"]["kernel"]
  assert not mask["encoder"]["cnn"]["bn1"]["scale"] and not mask["itm_head"]["bias"]


def test_cnn_gets_coupled_sgd_transformer_gets_adamw():
  """One update by hand: torch.optim.SGD (decay added to the gradient) and AdamW (decoupled decay)."""
  cfg = _config(warmup_steps=0)
  p = _params()
  tx, _ = optim.make_optimizer(cfg, p, steps_per_epoch=1000)
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)
  updates, _ = tx.update(g, tx.init(p), p)
  new = optax.apply_updates(p, updates)
  # SGD step 1: buf = g + wd * w; w -= lr * buf
  np.testing.assert_allclose(new["encoder"]["cnn"]["conv1"]["kernel"], 1 - 1e-2 * (0.5 + 5e-4), rtol=1e-6)
  np.testing.assert_allclose(new["encoder"]["cnn"]["bn1"]["scale"], 1 - 1e-2 * 0.5, rtol=1e-6)
  # AdamW step 1: m/sqrt(v) = sign(g) = 1; w -= lr * (1 + wd * w) for kernels, lr * 1 for biases.
  np.testing.assert_allclose(new["encoder"]["bert"]["dense"]["kernel"], 1 - 1e-4 * (1 + 1e-2), rtol=1e-5)
  np.testing.assert_allclose(new["itm_head"]["bias"], 1 - 1e-4, rtol=1e-5)


def test_cnn_adamw_option_decouples_decay_and_bad_names_fail():
  cfg = _config(warmup_steps=0)
  cfg.optim.cnn.optimizer = "adamw"
  p = _params()
  tx, _ = optim.make_optimizer(cfg, p, steps_per_epoch=1000)
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)
  new = optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])
  # AdamW step 1 at the CNN's lr and weight decay: w -= lr * (sign(g) + wd * w) on kernels only.
  np.testing.assert_allclose(new["encoder"]["cnn"]["conv1"]["kernel"], 1 - 1e-2 * (1 + 5e-4), rtol=1e-5)
  np.testing.assert_allclose(new["encoder"]["cnn"]["bn1"]["scale"], 1 - 1e-2, rtol=1e-5)
  cfg.optim.cnn.optimizer = "lamb"
  with pytest.raises(ValueError, match="optim.cnn.optimizer.*'lamb'"):
    optim.make_optimizer(cfg, p, steps_per_epoch=1000)


def test_frozen_cnn_does_not_move():
  cfg = _config(warmup_steps=0)
  cfg.model.cnn.frozen = True
  p = _params()
  tx, _ = optim.make_optimizer(cfg, p, steps_per_epoch=10)
  g = jax.tree.map(jnp.ones_like, p)
  new = optax.apply_updates(p, tx.update(g, tx.init(p), p)[0])
  np.testing.assert_array_equal(new["encoder"]["cnn"]["conv1"]["kernel"], p["encoder"]["cnn"]["conv1"]["kernel"])
  assert not np.allclose(new["itm_head"]["kernel"], p["itm_head"]["kernel"])
