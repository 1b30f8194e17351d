"""Custom-VJP kernels that the CNN's `cpu` implementation uses (models/resnet.py, `impl`): the same values and
gradients as their generic forms, written so that XLA's CPU backend runs them fast.

- `max_pool_first_max`: the stem max-pool, whose generic gradient (select-and-scatter, lowered with index
  iotas) costs 20x its forward on the CPU backend;
- `batch_norm_train`: batch norm with batch statistics and its closed-form gradient, which makes fewer passes
  over the activations than autodiff of mean, variance and the affine.

bench/HISTORY.md has the measurements behind each.
"""

import functools

import jax
import jax.numpy as jnp


def _window_taps(x, window, stride, pad, out_hw):
  """The window*window strided views of -inf-padded x, in row-major window order."""
  ho, wo = out_hw
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  return [xp[:, i : i + span_h : stride, j : j + span_w : stride, :] for i in range(window) for j in range(window)]


def _pool_out_hw(x, window, stride, pad):
  return tuple((d + 2 * pad - window) // stride + 1 for d in x.shape[1:3])


def _max_pool_fwd(x, window, stride, pad):
  if window * window > 127:
    raise ValueError(f"max_pool_first_max: a {window}x{window} window has more taps than an int8 " f"index holds")
  taps = _window_taps(x, window, stride, pad, _pool_out_hw(x, window, stride, pad))
  best, first = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for t, v in enumerate(taps[1:], start=1):
    # torch's rule: a later element wins only if strictly greater (or NaN), so ties go to the first.
    wins = (v > best) | jnp.isnan(v)
    best, first = jnp.where(wins, v, best), jnp.where(wins, jnp.int8(t), first)
  # The winner's index is saved, not recomputed by comparing values in the backward: XLA may re-fuse
  # the producer of x into the backward with different rounding, and equality would then miss.
  return best, (first, x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_first_max(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
  """NHWC max-pool (padding never wins, NaN propagates) whose gradient goes to the first maximum of each
  window in row-major order: torch's max_pool2d rule and XLA's select-and-scatter rule, so the gradient
  is `nn.max_pool`'s, but built from strided slices and pads instead of select-and-scatter."""
  return _max_pool_fwd(x, window, stride, pad)[0]


def _max_pool_bwd(window, stride, pad, res, g):
  first, (n, h, w, c) = res
  _, ho, wo, _ = g.shape
  hp, wp = h + 2 * pad, w + 2 * pad
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  zero = jnp.zeros((), g.dtype)
  dxp = jnp.zeros((n, hp, wp, c), g.dtype)
  for t in range(window * window):
    i, j = divmod(t, window)
    # Transpose of the strided slice: scatter back by interior padding.
    dxp = dxp + jax.lax.pad(
        jnp.where(first == t, g, zero),
        zero,
        ((0, 0, 0), (i, hp - i - span_h, stride - 1), (j, wp - j - span_w, stride - 1), (0, 0, 0)),
    )
  return (dxp[:, pad : pad + h, pad : pad + w, :],)


max_pool_first_max.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
  """Batch norm with batch statistics over all but the last axis -> (y, mean, biased var), with the
  closed-form gradient (fewer passes over x than autodiff of mean, var and the affine)."""
  return _batch_norm_fwd(x, scale, bias, eps)[0]


def _batch_norm_fwd(x, scale, bias, eps):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axis=axes)
  var = x.var(axis=axes)
  rstd = jax.lax.rsqrt(var + eps)
  return ((x - mean) * (scale * rstd) + bias, mean, var), (x, mean, rstd, scale)


def _batch_norm_bwd(eps, res, cotangents):
  x, mean, rstd, scale = res
  dy, dmean, dvar = cotangents  # dmean, dvar: zero where the statistics are used under stop_gradient
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  centered = x - mean
  xhat = centered * rstd
  dbias = dy.sum(axis=axes)
  dscale = (dy * xhat).sum(axis=axes)
  dx = (scale * rstd / n) * (n * dy - dbias - xhat * dscale) + (dmean + 2.0 * dvar * centered) / n
  return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
