"""Micro-batches in the step (optim.grad_accum_steps) and the fewest that fit (-1), on CPU.

No data is opened: the step context (model_context.py) builds the trainer's step from the config alone,
and the batches are the task's own `batch_spec` filled with random values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixelbert_jax import accumulation, model_context, partitioning
from pixelbert_jax import train_step as train_step_lib
from tests import train_helpers as th

BATCH = 8


def _config(**extra):
  # Every pixel (no sampling), no dropout, a frozen CNN in inference mode: the loss of a batch is then a
  # deterministic function of the batch, so 2 micro-batches must give the gradient of the whole batch.
  overrides = {
      "model.hidden_dropout": 0.0,
      "model.attention_dropout": 0.0,
      "model.pixel_sampling.enabled": False,
      "model.cnn.frozen": True,
      "model.vocab_size": 40,
      "batch_size": BATCH,
      "optim.warmup_steps": 0,
      **extra,
  }
  return th.tiny_config("/nonexistent", variant="demo_single", **overrides)


def _batch(context, seed=0):
  """A batch of the task's spec; MLM weights on every other token, so each micro-batch (rows i, i+2, ...)
  holds the same number of masked tokens and real examples: its mean loss weighs tokens as the batch's."""
  rng = np.random.default_rng(seed)
  spec = context.task.batch_spec(context.config, BATCH, model_context.largest_bucket(context.config))
  batch = {}
  for name, s in spec.items():
    if name == "image_mask" or name == "example_mask":
      batch[name] = np.ones(s.shape, s.dtype)
    elif name == "mlm_weights":
      batch[name] = np.tile(np.arange(s.shape[1]) % 2, (s.shape[0], 1)).astype(s.dtype)
    elif name == "itm_label":
      batch[name] = np.tile([0, 1], s.shape[0] // 2).astype(s.dtype)
    else:
      high = 256 if s.dtype == np.uint8 else 2 if s.dtype == np.bool_ else 40
      batch[name] = rng.integers(0, high, s.shape).astype(s.dtype)
  batch["text_mask"] = np.ones_like(batch["text_mask"])
  return batch


def _gradient_step(k):
  """The library's step with an optimizer whose state keeps the gradient it was given: gradient, metrics."""
  config = _config()
  mesh = partitioning.make_mesh(config.mesh_shape, jax.devices()[:1])
  context = model_context.StepContext(config, mesh, steps_per_epoch=10, accum_steps=k)
  tx = optax.GradientTransformation(
      init=lambda p: jax.tree.map(jnp.zeros_like, p), update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g)
  )
  state = context.init_state(0)
  state["opt_state"] = tx.init(state["params"])
  step = functools.partial(train_step_lib.train_step, model=context.model, task=context.task, tx=tx, accum_steps=k)
  with partitioning.activate(mesh):
    new_state, metrics = jax.jit(step)(state, partitioning.global_batch(_batch(context), mesh))
  return jax.device_get(new_state["opt_state"]), jax.device_get(metrics)


def test_two_micro_batches_give_the_whole_batch_gradient():
  g1, m1 = _gradient_step(1)
  g2, m2 = _gradient_step(2)
  # The same float32 sums in another order: each gradient entry differs by rounding, a few ulps of the
  # largest terms summed into it. 1e-5 of the leaf's largest entry is ~100 float32 ulps (eps 1.2e-7);
  # a wrong split (a micro-batch counted twice, a mean over the wrong count) is off by 10% or more.
  # Some gradients are zero in exact arithmetic (the attention keys' bias: softmax ignores a shift), and
  # their float values are rounding noise: their scale is floored at 1e-3 of the largest gradient.
  largest = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g1))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
    scale = max(float(np.max(np.abs(a))), 1e-3 * largest)
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0, err_msg=jax.tree_util.keystr(path))
  assert sum(float(np.abs(x).sum()) for x in jax.tree.leaves(g1)) > 0  # the test sees a real gradient
  # metrics: sums and counts add over micro-batches; accuracy = sum / count is the whole batch's
  for name in ("mlm_acc", "itm_acc"):
    np.testing.assert_allclose(m1[name][1], m2[name][1])
    np.testing.assert_allclose(m1[name][0] / m1[name][1], m2[name][0] / m2[name][1], atol=1e-6)
  assert float(m2["loss"][1]) == 2.0  # the mean of the 2 micro-batches' losses


def test_micro_batches_take_interleaved_rows():
  """Micro-batch i is rows i, i+k, ...: each device's contiguous slice splits into k local micro-batches."""
  from pixelbert_jax.train_step import _micro_batches

  x = jnp.arange(8)
  np.testing.assert_array_equal(_micro_batches({"x": x}, 2)["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])
  with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
    _micro_batches({"x": x}, 3)


def test_candidates_keep_whole_examples_per_device():
  assert accumulation.candidates(4096, 16) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
  assert accumulation.candidates(96, 4) == [1, 2, 3, 4, 6, 8, 12, 24]
  assert accumulation.candidates(10, 4) == []


def test_fewest_micro_batches_that_fit_a_budget():
  """-1 on CPU with `device_memory_gib` between the step's needs at 1 and 2 micro-batches picks 2; a budget
  below every candidate is one line naming the batch; no budget on CPU means one micro-batch."""
  config = _config(**{"optim.grad_accum_steps": -1})
  mesh = partitioning.make_mesh(config.mesh_shape, jax.devices()[:1])
  bucket = model_context.largest_bucket(config)
  need = {}
  for k in (1, 2):
    context = model_context.StepContext(config, mesh, steps_per_epoch=10, accum_steps=k)
    need[k] = accumulation.step_memory(context.compile_step(BATCH, bucket)).total
  assert need[2] < need[1], need  # half the activations alive at once
  assert accumulation.resolve(config, mesh, steps_per_epoch=10) == 1  # the CPU reports no memory limit
  config.device_memory_gib = (need[1] + need[2]) / 2 / accumulation.GIB
  assert accumulation.resolve(config, mesh, steps_per_epoch=10) == 2
  config.device_memory_gib = 1e-6
  with pytest.raises(ValueError, match=r"config.batch_size=8 does not fit .* with any optim.grad_accum_steps"):
    accumulation.resolve(config, mesh, steps_per_epoch=10)


def test_a_batch_that_does_not_split_is_refused_by_key():
  config = _config(**{"optim.grad_accum_steps": 3})
  mesh = partitioning.make_mesh(config.mesh_shape, jax.devices()[:1])
  with pytest.raises(ValueError, match=r"config.batch_size=8 must be divisible .*grad_accum_steps=3"):
    accumulation.resolve(config, mesh, steps_per_epoch=10)
