"""Pixel-BERT Flax models: `build_model(model_config, task)` and helpers to initialise them."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from pixelbert_jax.models.heads import (PixelBertNlvr2, PixelBertPretrain, PixelBertRetrieval, PixelBertVqa)
from pixelbert_jax.models.pixel_bert import PixelBertEncoder, sample_pixels
from pixelbert_jax.models.presets import model_config

TASKS = {
    "pretrain": PixelBertPretrain,
    "vqa": PixelBertVqa,
    "nlvr2": PixelBertNlvr2,
    "retrieval": PixelBertRetrieval,
}


def build_model(cfg: ml_collections.ConfigDict, task: str):
  """The Flax Linen module for `task` (pretrain | vqa | nlvr2 | retrieval) described by `cfg`."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
  frozen = cfg if isinstance(cfg, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(cfg)
  return TASKS[task](frozen)


def dummy_inputs(task: str, batch_size: int = 1, image_size=(64, 64), text_len: int = 8) -> dict:
  """Zero inputs of the right shapes and dtypes (for `init` / `eval_shape`)."""
  h, w = image_size
  inputs = dict(
      image=jnp.zeros((batch_size, h, w, 3), jnp.uint8),
      image_mask=jnp.ones((batch_size, h, w), bool),
      input_ids=jnp.zeros((batch_size, text_len), jnp.int32),
      text_mask=jnp.ones((batch_size, text_len), jnp.int32),
  )
  if task == "nlvr2":
    inputs.update(image1=inputs["image"], image1_mask=inputs["image_mask"])
  return inputs


def init_variables(model, key: jax.Array, task: str, **dummy_kwargs) -> Any:
  """`model.init` in eval mode on dummy inputs; parameters come back boxed with their logical names
  (use `flax.linen.meta.unbox` for plain arrays, `nn.get_partition_spec` for shardings)."""
  return model.init({"params": key}, **dummy_inputs(task, **dummy_kwargs), train=False)


__all__ = [
    "build_model",
    "dummy_inputs",
    "init_variables",
    "model_config",
    "sample_pixels",
    "PixelBertEncoder",
    "TASKS",
]
