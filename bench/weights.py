"""The weights every framework of one run starts from: the trainer's initial state for the config's seed
(`StepContext.init_state`), written once in torch_model.py's names by the JAX worker (a .npz the run removes)
and read by the PyTorch workers, which so need not initialise the model in JAX (10-20 s for BERT-base + R50
on a CPU)."""

from __future__ import annotations

import os

import numpy as np

from pixelbert_jax.convert import model_mapping


def save(path: str | None, config, state: dict) -> None:
  """Writes the model variables of `state` to `path` in PyTorch layout, unless a worker already did."""
  if path and not os.path.exists(path):
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    np.savez(path + ".tmp.npz", **model_mapping.export_state_dict(variables, config.model, config.task))
    os.replace(path + ".tmp.npz", path)


def init_on_cpu(config) -> dict:
  """The trainer's initial state of `config`, computed on one CPU device (PyTorch-only runs)."""
  import jax

  from pixelbert_jax import model_context, partitioning

  mesh = partitioning.make_mesh((1, 1, 1), jax.devices("cpu")[:1])
  return model_context.StepContext(config, mesh, steps_per_epoch=1, accum_steps=1).init_state(config.seed)


def torch_model(config, path: str | None):
  """torch_model.PixelBert of `config` with the weights at `path` (left by the JAX worker), else with the
  trainer's initial weights computed here."""
  from pixelbert_jax.convert.torch_model import pixelbert_from_state_dict

  if path and os.path.exists(path):
    with np.load(path) as f:
      state = {k: f[k] for k in f.files}
  else:
    init = init_on_cpu(config)
    variables = {"params": init["params"], "batch_stats": init["batch_stats"]}
    state = model_mapping.export_state_dict(variables, config.model, config.task)
  return pixelbert_from_state_dict(config.model, config.task, state)
