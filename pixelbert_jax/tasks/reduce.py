"""The one masked mean of the task losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum(values * weights) / count, count), count = sum(weights). The weights are 0/1 masks (real examples,
  masked tokens), so a count is 0 or at least 1: flooring it at 1 makes an empty mask's mean 0, not NaN."""
  count = jnp.sum(weights)
  return jnp.sum(values * weights) / jnp.maximum(count, 1.0), count
