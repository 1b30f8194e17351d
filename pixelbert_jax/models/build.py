"""`build_model(model_config, task)`: the Flax module of a task (its class comes from task_table.py), the
variables dict `model.apply` takes, and dummy inputs to initialise it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from pixelbert_jax import task_table


def build_model(cfg: ml_collections.ConfigDict, task: str):
  """The Flax Linen module for `task` (pretrain | vqa | nlvr2 | retrieval) described by `cfg`."""
  model_class = task_table.resolve(task_table.spec(task).model)
  for key in ("vocab_size", "num_answers"):
    if int(cfg.get(key, 1)) <= 0:  # -1 in the configs: the trainer sets it from the data before building
      raise ValueError(
          f"config.model.{key}={cfg.get(key)} is not a size: a config's -1 is replaced by the data's "
          "(pipeline.resolve_from_data) before a model is built"
      )
  frozen = cfg if isinstance(cfg, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(cfg)
  return model_class(frozen)


def variables(params, batch_stats) -> dict:
  """The variables dict of `model.apply`: batch statistics only where the CNN has batch norm."""
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def dummy_inputs(task: str, batch_size: int = 1, image_size=(64, 64), text_len: int = 8) -> dict:
  """Zero inputs of the right shapes and dtypes (for `init` / `eval_shape`): every image the task's model
  takes (task_table.py `images`), each with its mask, and a text."""
  h, w = image_size
  image, mask = jnp.zeros((batch_size, h, w, 3), jnp.uint8), jnp.ones((batch_size, h, w), bool)
  inputs = {}
  for key in task_table.spec(task).images:
    inputs.update({key: image, f"{key}_mask": mask})
  return dict(
      inputs,
      input_ids=jnp.zeros((batch_size, text_len), jnp.int32),
      text_mask=jnp.ones((batch_size, text_len), jnp.int32),
  )


def init_variables(model, key: jax.Array, task: str, **dummy_kwargs) -> Any:
  """`model.init` in eval mode on dummy inputs; parameters come back boxed with their logical names
  (use `flax.linen.meta.unbox` for plain arrays, `nn.get_partition_spec` for shardings)."""
  return model.init({"params": key}, **dummy_inputs(task, **dummy_kwargs), train=False)
