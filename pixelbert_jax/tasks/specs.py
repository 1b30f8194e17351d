"""Shapes and dtypes of what the data pipeline delivers, for each task's `batch_spec` (compile-only plans)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def struct(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def image(batch_size: int, image_hw: tuple[int, int], suffix: str = "") -> dict[str, jax.ShapeDtypeStruct]:
  """An image and its valid-pixel mask: uint8 pixels [B,H,W,3], bool mask [B,H,W]."""
  h, w = image_hw
  return {
      f"image{suffix}": struct((batch_size, h, w, 3), jnp.uint8),
      f"image{suffix}_mask": struct((batch_size, h, w), jnp.bool_),
  }


def text(batch_shape: tuple[int, ...], text_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Token ids and their mask, int32 [*batch_shape, L]."""
  shape = (*batch_shape, text_len)
  return {"input_ids": struct(shape, jnp.int32), "text_mask": struct(shape, jnp.int32)}


def examples(batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The mask of real examples (0 marks padding in a last, short batch)."""
  return {"example_mask": struct((batch_size,), jnp.float32)}
