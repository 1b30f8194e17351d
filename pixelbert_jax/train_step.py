"""The training state and step as pure functions of their inputs, importable without the data pipeline.

`train.Trainer` jits them with its shardings; `bench/train_step.py` and the tests call the same functions,
so what is benchmarked and tested is the step that trains. The model, the task module (tasks.Task) and the
optax transformation are keyword arguments, bound with functools.partial before jit.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from pixelbert_jax import optim
from pixelbert_jax.models.build import dummy_inputs, variables

State = dict[str, Any]  # step, params, batch_stats, opt_state, rng


def init_state(rng: jax.Array, *, model, task_name: str, tx: optax.GradientTransformation, text_len: int) -> State:
  """A fresh state: the model initialised on dummy inputs of the task (boxed with logical axis names, so
  `nn.get_partition_spec` of its eval_shape gives the shardings), the optimizer state, and `rng`, from
  which every step derives its dropout and pixel-sampling keys."""
  k_params, k_drop, k_sample = jax.random.split(rng, 3)
  initial = model.init(
      {"params": k_params, "dropout": k_drop, "sample": k_sample},
      **dummy_inputs(task_name, text_len=text_len),
      train=False,
  )
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": initial["params"],
      "batch_stats": initial.get("batch_stats", {}),
      "opt_state": tx.init(initial["params"]),
      "rng": rng,
  }


def loss_fn(
    params,
    batch_stats,
    batch: Mapping[str, jax.Array],
    rngs: Mapping[str, jax.Array],
    *,
    model,
    task,
    loss_weights: Mapping[str, Any] | None = None,
    update_batch_stats: bool = False,
) -> tuple[jax.Array, tuple[dict, Any]]:
  """The step's forward pass in training mode and the task's loss: (loss, (metrics, new batch_stats)).
  `rngs`: the `dropout` and `sample` keys. Differentiated with respect to `params` by `train_step`."""
  mutable = ["batch_stats"] if update_batch_stats else False
  out = model.apply(
      variables(params, batch_stats), **task.model_inputs(batch), train=True, rngs=dict(rngs), mutable=mutable
  )
  outputs, new_vars = out if mutable else (out, {})
  loss, metrics = task.loss_and_metrics(outputs, batch, **(loss_weights or {}))
  return loss, (metrics, new_vars.get("batch_stats", batch_stats))


def train_step(
    state: State,
    batch: Mapping[str, jax.Array],
    *,
    model,
    task,
    tx: optax.GradientTransformation,
    loss_weights: Mapping[str, Any] | None = None,
    update_batch_stats: bool = False,
) -> tuple[State, dict[str, tuple[jax.Array, jax.Array]]]:
  """One optimizer update on `batch`. Returns the new state and the task's metrics as (sum, count) pairs,
  plus `grad_norm`. The keys come from (state.rng, state.step), so a resumed run draws the same ones.
  `update_batch_stats`: a batch-norm CNN that trains updates its running statistics (config.model.cnn.norm
  'bn'); otherwise they stay as they are."""
  k_drop, k_sample = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
  objective = functools.partial(
      loss_fn, model=model, task=task, loss_weights=loss_weights, update_batch_stats=update_batch_stats
  )
  (_, (metrics, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
      state["params"], state["batch_stats"], batch, {"dropout": k_drop, "sample": k_sample}
  )
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  metrics["grad_norm"] = (optim.global_norm(grads), jnp.ones(()))
  new_state = {
      "step": state["step"] + 1,
      "params": optax.apply_updates(state["params"], updates),
      "batch_stats": batch_stats,
      "opt_state": opt_state,
      "rng": state["rng"],
  }
  return new_state, metrics
