"""The Pixel-BERT encoder: CNN feature pixels as tokens beside BERT text tokens in one transformer.

image uint8 [B,H,W,3] + valid mask -> ImageNet normalisation, padding set to 0 -> CNN to C5 (stride 32)
-> 1x1 conv to hidden -> 2x2 max-pool (stride 64 in all) -> flatten row-major -> + semantic vector s_v
(+ optional learned 2D position embedding) -> [optional random pixel sampling in training] ->
`[CLS] text [SEP] pixels` through BERT, with padding tokens and padding pixels masked out of attention.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixelbert_jax.models.bert import SEQ_AXES, BertModel, compute_dtype
from pixelbert_jax.models.resnet import CONV_AXES, resnet_from_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CELL = 64  # total stride of one feature pixel: C5 (32) then the 2x2 max-pool


def normalize_image(image: jax.Array, image_mask: jax.Array) -> jax.Array:
  """uint8 [B,H,W,3] -> float32, ImageNet mean/std, exactly 0 on padding (so padding content is inert)."""
  x = image.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return jnp.where(image_mask[..., None], x, 0.0)


def pixel_grid_mask(image_mask: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """Cell (i, j) is valid iff the top-left pixel of its 64x64 cell is valid. [B,H,W] -> [B,gh,gw]."""
  cells = image_mask[:, ::CELL, ::CELL]
  if cells.shape[1] < grid_h or cells.shape[2] < grid_w:
    raise ValueError(f"image_mask {image_mask.shape} too small for a {grid_h}x{grid_w} pixel grid")
  return cells[:, :grid_h, :grid_w].astype(bool)


def sample_pixels(key: jax.Array, pixels: jax.Array, pixel_mask: jax.Array, k: int):
  """Keep k distinct pixels per image, uniformly among the valid ones, never padding unless fewer than k
  are valid (then the extra slots come back masked out). k >= P returns the input unchanged.

  pixels [B,P,D], pixel_mask bool [B,P] -> (pixels [B,k,D], mask [B,k]); kept pixels stay in grid order.
  """
  b, p = pixel_mask.shape
  if k >= p:
    return pixels, pixel_mask
  if k <= 0:
    raise ValueError(f"num_pixels must be positive, got {k}")
  scores = jnp.where(pixel_mask, jax.random.uniform(key, (b, p)), -jnp.inf)
  _, idx = jax.lax.top_k(scores, k)
  idx = jnp.sort(idx, axis=-1)
  return (jnp.take_along_axis(pixels, idx[..., None], axis=1), jnp.take_along_axis(pixel_mask, idx, axis=1))


class VisualEmbedder(nn.Module):
  """C5 [B,h,w,C] -> pixel tokens [B,(h//2)*(w//2),D]: 1x1 conv, 2x2 max-pool, + s_v (+ 2D position)."""

  cfg: Any

  @nn.compact
  def __call__(self, c5: jax.Array) -> jax.Array:
    cfg = self.cfg
    d = cfg.hidden_size
    x = nn.Conv(
        d,
        (1, 1),
        dtype=compute_dtype(cfg),
        param_dtype=jnp.float32,
        name="proj",
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
    )(c5)
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    b, gh, gw, _ = x.shape
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("embed",))
    x = x + self.param("semantic", init, (d,), jnp.float32).astype(x.dtype)
    if cfg.pos_embed_2d:
      if gh > cfg.max_grid or gw > cfg.max_grid:
        raise ValueError(f"pixel grid {gh}x{gw} exceeds max_grid {cfg.max_grid}")
      pinit = nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("position", "embed"))
      rows = self.param("row_embed", pinit, (cfg.max_grid, d), jnp.float32)[:gh]
      cols = self.param("col_embed", pinit, (cfg.max_grid, d), jnp.float32)[:gw]
      x = x + (rows[:, None] + cols[None, :]).astype(x.dtype)
    return x.reshape(b, gh * gw, d)


class PixelBertEncoder(nn.Module):
  """`cnn`, `visual`, `bert` (incl. pooler): everything of Pixel-BERT but the task heads."""

  cfg: Any

  def setup(self):
    self.cnn = resnet_from_config(self.cfg.cnn, compute_dtype(self.cfg))
    self.visual = VisualEmbedder(self.cfg)
    self.bert = BertModel(self.cfg)

  def cnn_features(self, image, image_mask, train: bool = False):
    """uint8 [B,H,W,3], bool [B,H,W] -> (C5 [B,H//32,W//32,C], pixel_mask [B,P]), P = (H//64) * (W//64).

    A frozen CNN (`cnn.frozen`) runs in inference mode under stop_gradient: what feature_cache.py computes
    once per image. Data buckets are multiples of 64; other sizes work (800x1344 -> 25x42 -> 12x21 pixels)."""
    if image.ndim != 4 or image.shape[-1] != 3 or image_mask.shape != image.shape[:3]:
      raise ValueError(f"expected image [B,H,W,3] and image_mask [B,H,W], got {image.shape} and " f"{image_mask.shape}")
    if image.shape[1] < CELL or image.shape[2] < CELL:
      raise ValueError(f"image {image.shape}: height and width must be at least {CELL}")
    image_mask = image_mask.astype(bool)
    frozen = self.cfg.cnn.get("frozen", False)  # configs of older checkpoints lack the key
    c5 = self.cnn(normalize_image(image, image_mask), train and not frozen)
    if frozen:
      c5 = jax.lax.stop_gradient(c5)
    gh, gw = c5.shape[1] // 2, c5.shape[2] // 2
    return c5, pixel_grid_mask(image_mask, gh, gw).reshape(image.shape[0], gh * gw)

  def encode_image(self, image, image_mask, train: bool = False, c5=None, pixel_mask=None):
    """uint8 [B,H,W,3], bool [B,H,W] -> (pixels [B,P,D], pixel_mask [B,P]); or, in place of the image, a frozen
    CNN's cached `c5` [B,h,w,C] and `pixel_mask` [B,(h//2)*(w//2)] (feature_cache.py): no CNN pass."""
    if c5 is None:
      c5, pixel_mask = self.cnn_features(image, image_mask, train)
    elif not self.cfg.cnn.get("frozen", False):
      raise ValueError("cached CNN features (c5) need a frozen CNN (model.cnn.frozen=True): a trained one changes")
    elif pixel_mask is None or pixel_mask.shape != (c5.shape[0], (c5.shape[1] // 2) * (c5.shape[2] // 2)):
      raise ValueError(
          f"cached c5 {c5.shape} needs pixel_mask [B,(h//2)*(w//2)], got {getattr(pixel_mask, 'shape', None)}"
      )
    pixels = self.visual(c5)
    return nn.with_logical_constraint(pixels, SEQ_AXES), pixel_mask.astype(bool)

  def fuse(self, input_ids, text_mask, pixels, pixel_mask, train: bool = False):
    """`[CLS] text [SEP] pixels` through BERT -> (sequence [B,L+P,D], pooled [B,D])."""
    text = self.bert.embed_text(input_ids, not train)
    x = jnp.concatenate([text, pixels.astype(text.dtype)], axis=1)
    mask = jnp.concatenate([text_mask.astype(bool), pixel_mask.astype(bool)], axis=1)
    seq = self.bert.encode(nn.with_logical_constraint(x, SEQ_AXES), mask, not train)
    return seq, self.bert.pool(seq)

  def attend(self, x):
    return self.bert.attend(x)

  def __call__(
      self,
      image,
      image_mask,
      input_ids,
      text_mask,
      train: bool = False,
      allow_sampling: bool = True,
      c5=None,
      pixel_mask=None,
  ):
    """-> dict(sequence, pooled, pixel_mask). Pixel sampling iff train and cfg.pixel_sampling.enabled
    and the task allows it (pre-training does; fine-tuning uses all pixels, as in the paper). `c5` and
    `pixel_mask`: cached features of a frozen CNN in place of the image (`encode_image`)."""
    pixels, pixel_mask = self.encode_image(image, image_mask, train, c5, pixel_mask)
    if train and allow_sampling and self.cfg.pixel_sampling.enabled:
      pixels, pixel_mask = sample_pixels(
          self.make_rng("sample"), pixels, pixel_mask, self.cfg.pixel_sampling.num_pixels
      )
    seq, pooled = self.fuse(input_ids, text_mask, pixels, pixel_mask, train)
    return dict(sequence=seq, pooled=pooled, pixel_mask=pixel_mask)
