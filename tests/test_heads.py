"""Task models: output contracts of pretrain / vqa / nlvr2 / retrieval and what each head is built on."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from pixelbert_jax.models.build import build_model, dummy_inputs, init_variables
from pixelbert_jax.models.presets import model_config
from pixelbert_jax.task_table import TASKS

jax.config.update("jax_default_matmul_precision", "highest")
RNGS = {"dropout": jax.random.key(1), "sample": jax.random.key(2)}


def _cfg():
  return model_config("tiny", "tiny", vocab_size=41)  # gn CNN: no batch_stats


def _random_variables(model, task, seed=0, **kw):
  """Random float32 values in the tree `init` would build (a real init compiles slowly on CPU)."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init_variables(model, jax.random.key(0), task, **kw)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _inputs(task, seed=0, b=2, hw=(128, 192), text_len=7):
  rng = np.random.default_rng(seed)
  x = dummy_inputs(task, b, hw, text_len)
  x["image"] = jnp.asarray(rng.integers(0, 256, x["image"].shape, dtype=np.uint8))
  x["input_ids"] = jnp.asarray(rng.integers(1, 41, x["input_ids"].shape).astype(np.int32))
  if task == "nlvr2":
    x["image1"] = jnp.asarray(rng.integers(0, 256, x["image"].shape, dtype=np.uint8))
  return x


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,key,shape",
    [
        ("pretrain", "mlm_logits", (2, 7, 41)),
        ("pretrain", "itm_logits", (2, 2)),
        ("vqa", "vqa_logits", (2, 16)),
        ("nlvr2", "nlvr2_logits", (2, 2)),
        ("retrieval", "retrieval_logits", (2,)),
    ],
)
def test_output_contract(task, key, shape):
  cfg = _cfg()
  model = build_model(cfg, task)
  out = jax.eval_shape(
      lambda: model.apply(init_variables(model, jax.random.key(0), task), **_inputs(task), train=True, rngs=RNGS)
  )
  assert out[key].shape == shape and out[key].dtype == jnp.float32
  # 128x192 -> a 2x3 grid; only pre-training samples (tiny keeps 4 of 6).
  assert out["pixel_mask"].shape == (2, 4 if task == "pretrain" else 6)


@pytest.mark.slow
def test_parameter_trees():
  cfg = _cfg()
  heads = {
      "pretrain": {"mlm_head", "itm_head"},
      "vqa": {"vqa_head"},
      "nlvr2": {"nlvr2_head"},
      "retrieval": {"retrieval_head"},
  }
  for task in TASKS:
    model = build_model(cfg, task)
    params = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), task))["params"]
    assert set(params) == {"encoder"} | heads[task]
    assert set(params["encoder"]) == {"cnn", "visual", "bert"}
    assert "pooler" in params["encoder"]["bert"]
  # The MLM decoder is the word embedding matrix: no decoder kernel of its own.
  pre = jax.eval_shape(lambda: init_variables(build_model(cfg, "pretrain"), jax.random.key(0), "pretrain"))["params"]
  assert set(pre["mlm_head"]) == {"dense", "LayerNorm", "bias"}


@pytest.mark.slow
def test_nlvr2_concatenates_both_pooled_vectors_in_order():
  cfg = _cfg()
  model = build_model(cfg, "nlvr2")
  variables = _random_variables(model, "nlvr2", image_size=(128, 192), text_len=7)
  x = _inputs("nlvr2", seed=3)
  logits = model.apply(variables, **x)["nlvr2_logits"]
  swapped = dict(x, image=x["image1"], image1=x["image"])
  logits_swapped = model.apply(variables, **swapped)["nlvr2_logits"]
  assert not np.allclose(logits, logits_swapped)

  def pooled(image):
    pixels, mask = model.apply(variables, image, x["image_mask"], method="encode_image")
    return model.apply(variables, x["input_ids"], x["text_mask"], pixels, mask, method="fuse")[1]

  both = jnp.concatenate([pooled(x["image"]), pooled(x["image1"])], axis=-1)
  head = nn.meta.unbox(variables)["params"]["nlvr2_head"]
  h = both @ head["dense_0"]["kernel"] + head["dense_0"]["bias"]
  h = nn.LayerNorm(epsilon=cfg.layer_norm_eps).apply({"params": head["LayerNorm"]}, nn.gelu(h, approximate=False))
  want = h @ head["dense_1"]["kernel"] + head["dense_1"]["bias"]
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mlm_logits_are_tied_to_word_embeddings():
  cfg = _cfg()
  model = build_model(cfg, "pretrain")
  variables = _random_variables(model, "pretrain", seed=4, image_size=(128, 192), text_len=7)
  x = _inputs("pretrain", seed=5)
  base = model.apply(variables, **x)["mlm_logits"]
  # Changing one row of the word embeddings changes that vocabulary column at every position.
  emb = variables["params"]["encoder"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
  unused = int(np.setdiff1d(np.arange(41), np.asarray(x["input_ids"]))[0])
  bumped = jax.tree.map(lambda a: a, variables)
  bumped["params"]["encoder"]["bert"]["embeddings"]["word_embeddings"]["embedding"] = emb.at[unused].add(1.0)
  out = model.apply(bumped, **x)["mlm_logits"]
  changed = np.abs(np.asarray(out) - np.asarray(base)).max(axis=(0, 1)) > 1e-6
  assert changed[unused] and changed.sum() == 1


@pytest.mark.slow
def test_vqa_and_retrieval_never_sample_pixels():
  cfg = _cfg()
  for task in ("vqa", "retrieval"):
    model = build_model(cfg, task)
    variables = _random_variables(model, task, seed=6, image_size=(128, 192), text_len=7)
    x = _inputs(task, seed=7)
    out = model.apply(variables, **x, train=True, rngs=RNGS)
    assert out["pixel_mask"].shape == (2, 6)
