"""Optimizers and schedules: SGD + momentum for the CNN, AdamW for everything else (the paper's recipe).

Learning-rate schedules are written in steps, derived from epochs and the dataset size in `train.py`, so the
config speaks the paper's language (decay at epochs 25 and 35) while the optimizer sees step counts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

CNN_PATH = ("encoder", "cnn")


def schedule(
    base_lr: float,
    *,
    warmup_steps: int,
    decay_steps: Sequence[int],
    decay_factor: float,
) -> optax.Schedule:
  """Linear warm-up from 0 to `base_lr`, then multiply by `decay_factor` at each of `decay_steps`."""
  boundaries = {int(s): float(decay_factor) for s in sorted(decay_steps) if s > 0}
  decay = optax.piecewise_constant_schedule(base_lr, boundaries)
  if warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  # Step boundaries of the decay are absolute: the joined schedule restarts its count at warmup_steps,
  # so shift the decay schedule back.
  return optax.join_schedules([warmup, lambda s: decay(s + warmup_steps)], [warmup_steps])


def param_labels(params: Any, freeze_cnn: bool) -> Any:
  """'cnn' for the CNN (or 'frozen' when it is not trained), 'transformer' for everything else."""
  flat = traverse_util.flatten_dict(params)
  cnn_label = "frozen" if freeze_cnn else "cnn"
  labels = {k: cnn_label if k[: len(CNN_PATH)] == CNN_PATH else "transformer" for k in flat}
  return traverse_util.unflatten_dict(labels)


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and conv kernels only: never on biases, norm scales or the semantic vector."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: (v.ndim >= 2 and k[-1] in ("kernel", "embedding")) for k, v in flat.items()})


def make_optimizer(
    cfg: ml_collections.ConfigDict,
    params: Any,
    *,
    steps_per_epoch: int,
) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """Builds the optimizer from `config.optim` and returns it with its schedules (for logging)."""
  o = cfg.optim
  decay_steps = [int(round(e * steps_per_epoch)) for e in o.decay_epochs]
  sched = {
      name: schedule(o[name].lr, warmup_steps=o.warmup_steps, decay_steps=decay_steps, decay_factor=o.decay_factor)
      for name in ("cnn", "transformer")
  }
  mask = decay_mask(params)
  kind = o.cnn.get("optimizer", "sgd")
  if kind == "sgd":
    cnn = optax.chain(
        # torch.optim.SGD couples weight decay into the gradient before momentum; so does this chain.
        optax.add_decayed_weights(o.cnn.weight_decay, mask=mask),
        optax.sgd(sched["cnn"], momentum=o.cnn.momentum or None, nesterov=False),
    )
  elif kind == "adamw":
    # A CNN trained from scratch (the demo) gets tiny gradients through the fusion attention; SGD then
    # barely moves it, Adam's per-parameter scaling does.
    cnn = optax.adamw(
        sched["cnn"],
        b1=o.transformer.b1,
        b2=o.transformer.b2,
        eps=o.transformer.eps,
        weight_decay=o.cnn.weight_decay,
        mask=mask,
    )
  else:
    raise ValueError(f"config.optim.cnn.optimizer must be 'sgd' or 'adamw', got {kind!r}")
  transformer = optax.adamw(
      sched["transformer"],
      b1=o.transformer.b1,
      b2=o.transformer.b2,
      eps=o.transformer.eps,
      weight_decay=o.transformer.weight_decay,
      mask=mask,
  )
  tx = optax.multi_transform(
      {"cnn": cnn, "transformer": transformer, "frozen": optax.set_to_zero()},
      param_labels(params, freeze_cnn=bool(cfg.model.cnn.frozen)),
  )
  if o.grad_clip_norm and o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, sched


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
