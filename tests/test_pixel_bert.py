"""Pixel-BERT encoder: pixel sampling, feature-pixel mask, padding invariance, cached image features."""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from pixelbert_jax.models.build import build_model, init_variables
from pixelbert_jax.models.presets import model_config
from pixelbert_jax.models.pixel_bert import sample_pixels
from pixelbert_jax.models.pixel_bert import pixel_grid_mask

jax.config.update("jax_default_matmul_precision", "highest")
H, W, L = 192, 256, 10  # a 3x4 pixel grid


@pytest.fixture(scope="module")
def tiny():
  cfg = model_config("tiny", "tiny", vocab_size=61)
  cfg.cnn.norm = "bn"  # exercise batch_stats too
  model = build_model(cfg, "pretrain")
  variables = nn.meta.unbox(init_variables(model, jax.random.key(0), "pretrain", image_size=(H, W), text_len=L))
  return cfg, model, variables


def _batch(seed, valid_hw=((130, 256), (192, 100)), text_lens=(10, 6)):
  rng = np.random.default_rng(seed)
  b = len(valid_hw)
  image = rng.integers(0, 256, (b, H, W, 3), dtype=np.uint8)
  mask = np.zeros((b, H, W), bool)
  for i, (h, w) in enumerate(valid_hw):
    mask[i, :h, :w] = True
  image = np.where(mask[..., None], image, 0).astype(np.uint8)
  ids = rng.integers(1, 61, (b, L)).astype(np.int32)
  text_mask = (np.arange(L)[None] < np.asarray(text_lens)[:, None]).astype(np.int32)
  ids = np.where(text_mask > 0, ids, 0).astype(np.int32)
  return dict(image=image, image_mask=mask, input_ids=ids, text_mask=text_mask)


# ------------------------------------------------------------------------------------ pixel sampling
def _pixels_with_ids(b, p, d=3):
  ids = np.arange(b * p, dtype=np.float32).reshape(b, p)
  return jnp.asarray(np.repeat(ids[..., None], d, axis=-1)), ids


def test_sample_pixels_draws_k_distinct_valid_pixels():
  pixels, ids = _pixels_with_ids(3, 20)
  mask = np.ones((3, 20), bool)
  mask[0, 12:] = False  # 12 valid
  mask[1, ::2] = False  # 10 valid, interleaved
  mask[2, 3:] = False  # 3 valid: fewer than k
  k = 8
  out, out_mask = sample_pixels(jax.random.key(0), pixels, jnp.asarray(mask), k)
  out, out_mask = np.asarray(out), np.asarray(out_mask)
  assert out.shape == (3, k, 3) and out_mask.shape == (3, k)
  valid_ids = [set(ids[i][mask[i]]) for i in range(3)]
  for i in range(3):
    chosen = out[i, :, 0][out_mask[i]]
    assert len(set(chosen)) == len(chosen)  # distinct
    assert set(chosen) <= valid_ids[i]  # never padding
    assert out_mask[i].sum() == min(k, len(valid_ids[i]))
  assert set(out[2, :, 0][out_mask[2]]) == valid_ids[2]  # all 3 valid kept, 5 slots masked


def test_sample_pixels_keys():
  pixels, _ = _pixels_with_ids(2, 50)
  mask = jnp.ones((2, 50), bool)
  a = sample_pixels(jax.random.key(1), pixels, mask, 10)[0]
  b = sample_pixels(jax.random.key(1), pixels, mask, 10)[0]
  c = sample_pixels(jax.random.key(2), pixels, mask, 10)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sample_pixels_is_identity_when_k_covers_all():
  pixels, _ = _pixels_with_ids(2, 6)
  mask = jnp.asarray(np.array([[1, 1, 1, 0, 0, 0], [1] * 6], bool))
  out, out_mask = sample_pixels(jax.random.key(0), pixels, mask, 6)
  assert out is pixels and out_mask is mask


def test_sample_pixels_is_uniform_over_valid_pixels():
  pixels, _ = _pixels_with_ids(1, 10)
  mask = jnp.asarray(np.array([[1] * 8 + [0] * 2], bool))
  draws = jax.vmap(lambda k: sample_pixels(k, pixels, mask, 2)[0][0, :, 0])(jax.random.split(jax.random.key(3), 4000))
  counts = np.bincount(np.asarray(draws).astype(int).ravel(), minlength=10)
  assert counts[8:].sum() == 0
  expected = 4000 * 2 / 8
  assert np.abs(counts[:8] - expected).max() < 5 * np.sqrt(expected)


# ------------------------------------------------------------------------------------- pixel mask
def test_pixel_grid_mask_uses_top_left_pixel_of_each_cell():
  mask = np.zeros((1, 192, 256), bool)
  mask[0, :65, :129] = True  # rows 0,1 and columns 0,1,2 have a valid top-left pixel
  grid = np.asarray(pixel_grid_mask(jnp.asarray(mask), 3, 4))
  want = np.zeros((1, 3, 4), bool)
  want[0, :2, :3] = True
  np.testing.assert_array_equal(grid, want)


# --------------------------------------------------------------------------------- the whole model
def _apply(model, variables, batch, train, sample_key=0):
  return model.apply(
      variables,
      **{k: jnp.asarray(v) for k, v in batch.items()},
      train=train,
      rngs={"dropout": jax.random.key(5), "sample": jax.random.key(sample_key)},
  )


@pytest.mark.slow
def test_padding_content_does_not_change_real_outputs(tiny):
  cfg, model, variables = tiny
  batch = _batch(0)
  other = dict(batch)
  rng = np.random.default_rng(1)
  noise = rng.integers(0, 256, batch["image"].shape, dtype=np.uint8)
  other["image"] = np.where(batch["image_mask"][..., None], batch["image"], noise).astype(np.uint8)
  other["input_ids"] = np.where(
      batch["text_mask"] > 0, batch["input_ids"], rng.integers(1, 61, batch["input_ids"].shape)
  ).astype(np.int32)
  assert (other["image"] != batch["image"]).any() and (other["input_ids"] != batch["input_ids"]).any()
  real = batch["text_mask"].astype(bool)
  for train in (False, True):
    a, b = _apply(model, variables, batch, train), _apply(model, variables, other, train)
    np.testing.assert_array_equal(a["pixel_mask"], b["pixel_mask"])
    assert np.abs(np.asarray(a["mlm_logits"]) - np.asarray(b["mlm_logits"]))[real].max() <= 1e-6
    assert np.abs(np.asarray(a["itm_logits"]) - np.asarray(b["itm_logits"])).max() <= 1e-6


def test_padding_pixel_tokens_are_not_attended(tiny):
  """fuse masks the padding pixels out of attention: changing the pixel tokens at padded positions (after the
  CNN, where normalize_image's zeroing cannot hide them) leaves every real position and the pooled vector as
  they were. Masked keys get a float32-min bias, so their softmax weight underflows to exactly 0: the real
  outputs agree to rounding (1e-6). The same change at real pixels moves them, so the test sees attention."""
  cfg, model, variables = tiny
  batch = {k: jnp.asarray(v) for k, v in _batch(0).items()}
  # pixel tokens as encode_image gives them for _batch's images: 3x4 cells, the second image's last 2 columns
  # padding (test_padding_pixels_are_masked_and_counted_right)
  pixel_mask = jnp.asarray(np.stack([np.ones(12, bool), np.tile([True, True, False, False], 3)]))
  pixels = jax.random.normal(jax.random.key(2), (2, 12, cfg.hidden_size))
  fuse = jax.jit(
      lambda px: model.apply(
          variables, batch["input_ids"], batch["text_mask"], px, pixel_mask, method=lambda m, *a: m.encoder.fuse(*a)
      )
  )
  pad = ~np.asarray(pixel_mask)
  assert pad.any() and not pad.all()
  noise = 10.0 * jax.random.normal(jax.random.key(3), pixels.shape)
  seq, pooled = fuse(pixels)
  seq_pad, pooled_pad = fuse(jnp.where(pad[..., None], pixels + noise, pixels))
  seq_real, pooled_real = fuse(jnp.where(pad[..., None], pixels, pixels + noise))
  real = np.concatenate([np.asarray(batch["text_mask"], bool), ~pad], axis=1)
  assert np.abs(np.asarray(seq_pad - seq))[real].max() <= 1e-6
  assert np.abs(np.asarray(pooled_pad - pooled)).max() <= 1e-6
  assert np.abs(np.asarray(pooled_real - pooled)).max() > 1e-3


def test_padding_pixels_are_masked_and_counted_right(tiny):
  cfg, model, variables = tiny
  out = _apply(model, variables, _batch(2), train=False)
  mask = np.asarray(out["pixel_mask"])
  # 130x256 valid -> rows 0..2 (0, 64, 128 < 130), all 4 columns; 192x100 -> columns 0, 1 only.
  assert mask.shape == (2, 12)
  np.testing.assert_array_equal(mask[0], np.ones(12, bool))
  np.testing.assert_array_equal(mask[1].reshape(3, 4), np.tile([True, True, False, False], (3, 1)))


@pytest.mark.slow
def test_sampling_only_in_training_and_keyed(tiny):
  cfg, model, variables = tiny
  batch = _batch(3)
  k = cfg.pixel_sampling.num_pixels
  ev = _apply(model, variables, batch, train=False)
  assert ev["pixel_mask"].shape == (2, 12)
  t1, t1b = _apply(model, variables, batch, True, 1), _apply(model, variables, batch, True, 1)
  t2 = _apply(model, variables, batch, True, 2)
  assert t1["pixel_mask"].shape == (2, k) and bool(t1["pixel_mask"].all())
  np.testing.assert_array_equal(t1["itm_logits"], t1b["itm_logits"])
  assert not np.allclose(t1["itm_logits"], t2["itm_logits"])
  cfg_off = model_config("tiny", "tiny", vocab_size=61)
  cfg_off.cnn.norm, cfg_off.pixel_sampling.enabled = "bn", False
  off = _apply(build_model(cfg_off, "pretrain"), variables, batch, train=True)
  assert off["pixel_mask"].shape == (2, 12)


def test_bn_statistics_update_only_when_mutable(tiny):
  cfg, model, variables = tiny
  batch = {k: jnp.asarray(v) for k, v in _batch(4).items()}
  _, upd = model.apply(
      variables,
      **batch,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(0), "sample": jax.random.key(0)},
  )
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(upd["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(after, before))


@pytest.mark.slow
def test_cached_image_features_give_the_same_scores():
  cfg = model_config("tiny", "tiny", vocab_size=61)
  model = build_model(cfg, "retrieval")
  variables = nn.meta.unbox(init_variables(model, jax.random.key(1), "retrieval", image_size=(H, W), text_len=L))
  batch = {k: jnp.asarray(v) for k, v in _batch(5).items()}
  direct = model.apply(variables, **batch)["retrieval_logits"]
  pixels, pixel_mask = model.apply(variables, batch["image"], batch["image_mask"], method="encode_image")
  cached = model.apply(variables, batch["input_ids"], batch["text_mask"], pixels, pixel_mask, method="score_pixels")
  assert direct.shape == (2,)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(direct), rtol=1e-6, atol=1e-6)


ALLOWED_PARAM_AXES = {None, "vocab", "embed", "mlp", "kv", "conv_in", "conv_out", "norm", "classes", "position"}


def test_every_parameter_has_logical_names():
  cfg = model_config("tiny", "tiny", vocab_size=61)
  cfg.cnn.norm, cfg.pos_embed_2d = "frozen_bn", True
  for task in ("pretrain", "nlvr2"):
    model = build_model(cfg, task)
    boxed = jax.eval_shape(functools.partial(init_variables, model, task=task), jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned), leaf
      assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= ALLOWED_PARAM_AXES
