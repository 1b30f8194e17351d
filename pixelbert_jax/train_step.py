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


def _micro_batches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B,...] -> [k,B/k,...] with micro-batch i = rows i, i+k, i+2k, ...: each device's contiguous slice of
  the batch splits into k local micro-batches, so no example moves between devices (a [k,B/k] split by
  consecutive rows would put each micro-batch on a few devices only)."""

  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"a batch of {x.shape[0]} does not split into {k} micro-batches (optim.grad_accum_steps)")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  return {name: split(x) for name, x in batch.items()}


def train_step(
    state: State,
    batch: Mapping[str, jax.Array],
    *,
    model,
    task,
    tx: optax.GradientTransformation,
    loss_weights: Mapping[str, Any] | None = None,
    update_batch_stats: bool = False,
    accum_steps: int = 1,
) -> tuple[State, dict[str, tuple[jax.Array, jax.Array]]]:
  """One optimizer update on `batch`. Returns the new state and the task's metrics as (sum, count) pairs,
  plus `grad_norm`. The keys come from (state.rng, state.step), so a resumed run draws the same ones.
  `update_batch_stats`: a batch-norm CNN that trains updates its running statistics (config.model.cnn.norm
  'bn'); otherwise they stay as they are.

  `accum_steps` k > 1: the batch is cut into k micro-batches (`_micro_batches`) that run one after the
  other in a `lax.scan`, so only one micro-batch's activations are alive at a time. The update uses the
  mean of their gradients: each micro-batch's loss is its own mean (over its masked tokens, its real
  examples), so a micro-batch with fewer masked tokens weighs each of them a little more than one big batch
  would. Batch-norm statistics are those of each micro-batch, updated in turn; the metrics' sums and counts
  add up over the micro-batches. Each micro-batch draws its own dropout and sampling keys."""
  k_drop, k_sample = jax.random.split(jax.random.fold_in(state["rng"], state["step"]))
  objective = functools.partial(
      loss_fn, model=model, task=task, loss_weights=loss_weights, update_batch_stats=update_batch_stats
  )
  grad_fn = jax.value_and_grad(objective, has_aux=True)
  if accum_steps <= 1:
    (_, (metrics, batch_stats)), grads = grad_fn(
        state["params"], state["batch_stats"], batch, {"dropout": k_drop, "sample": k_sample}
    )
  else:
    micro_batches = _micro_batches(batch, accum_steps)

    def micro(carry, inputs):
      grad_sum, stats, metric_sums = carry
      i, micro_batch = inputs
      rngs = {"dropout": jax.random.fold_in(k_drop, i), "sample": jax.random.fold_in(k_sample, i)}
      (_, (m, stats)), g = grad_fn(state["params"], stats, micro_batch, rngs)
      # Summed in float32 whatever the compute dtype (the parameters are float32).
      grad_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grad_sum, g)
      return (grad_sum, stats, jax.tree.map(jnp.add, metric_sums, m)), None

    # The metrics' tree (names, (sum, count)) is the task's: traced once, on the first micro-batch's shapes.
    first = jax.tree.map(lambda x: x[0], micro_batches)
    metric_shapes = jax.eval_shape(
        lambda: grad_fn(state["params"], state["batch_stats"], first, {"dropout": k_drop, "sample": k_sample})
    )[0][1][0]
    zeros = (
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"]),
        state["batch_stats"],
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
    )
    (grad_sum, batch_stats, metrics), _ = jax.lax.scan(micro, zeros, (jnp.arange(accum_steps), micro_batches))
    grads = jax.tree.map(lambda g, p: (g / accum_steps).astype(p.dtype), grad_sum, state["params"])
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
