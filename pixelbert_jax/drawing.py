"""Attention maps as pictures (PIL + numpy): a grid map placed on its image, coloured, labelled, tiled.

No model here: visualize.py gives these functions the maps attention.py computed.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pixelbert_jax.models.pixel_bert import CELL

MIN_LONG_SIDE = 256  # smaller images are drawn at an integer multiple of their size, so labels stay legible
GRID_COLUMNS = 4

# Jet-like, from blue (little attention) through cyan and yellow to red (the word's most attended pixel).
_CMAP_STOPS = np.array([0.0, 0.35, 0.65, 1.0], np.float32)
_CMAP_RGB = np.array([(0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0)], np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
  """float [..] in [0, 1] -> uint8 [.., 3]."""
  v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
  rgb = [np.interp(v, _CMAP_STOPS, _CMAP_RGB[:, c]) for c in range(3)]
  return np.clip(np.stack(rgb, axis=-1), 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
    return ImageFont.load_default()


def output_size(height: int, width: int) -> tuple[int, int]:
  """(H, W) the pictures are drawn at: the image's, times the integer that brings its long side to at least
  MIN_LONG_SIDE (an integer keeps the aspect ratio exact)."""
  k = max(1, math.ceil(MIN_LONG_SIDE / max(height, width)))
  return height * k, width * k


def upsample(
    grid_map: np.ndarray,
    bucket: tuple[int, int],
    valid_hw: tuple[int, int],
    out_hw: tuple[int, int],
    nearest: bool = False,
) -> np.ndarray:
  """float32 [gh, gw] over the padded bucket's 64x64 cells -> [H, W] over the image alone.

  Feature pixel (i, j) covers bucket rows 64i..64i+63 and columns 64j..64j+63; the image is the bucket's
  top-left valid_hw (resize_and_pad), so the map is upsampled to the bucket, cropped, then resized to out_hw."""
  resample = Image.NEAREST if nearest else Image.BILINEAR
  gh, gw = grid_map.shape
  full = Image.fromarray(np.asarray(grid_map, np.float32), mode="F")
  full = full.resize((gw * CELL, gh * CELL), resample)
  arr = np.zeros(bucket, np.float32)
  h, w = min(bucket[0], gh * CELL), min(bucket[1], gw * CELL)
  arr[:h, :w] = np.asarray(full)[:h, :w]
  crop = Image.fromarray(arr[: valid_hw[0], : valid_hw[1]], mode="F")
  return np.asarray(crop.resize((out_hw[1], out_hw[0]), resample), np.float32)


def label(img: Image.Image, text: str) -> Image.Image:
  """Writes `text` in white on a translucent dark strip across the top of the picture."""
  size = max(11, img.width // 18)
  font = _font(size)
  layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
  draw = ImageDraw.Draw(layer)
  box = draw.textbbox((0, 0), text, font=font)
  pad = max(2, size // 4)
  draw.rectangle((0, 0, img.width, box[3] + 2 * pad), fill=(0, 0, 0, 150))
  draw.text((pad, pad), text, font=font, fill=(255, 255, 255, 255))
  return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def overlay(image: np.ndarray, heat: np.ndarray, text: str, alpha: float = 0.7) -> Image.Image:
  """uint8 [H,W,3] image, float [H,W] map -> the picture, labelled with `text`.

  The map is scaled to its own maximum and both colours and opacity follow it, so pixels the word ignores
  show the image as it is, and a word that attends everywhere alike covers it all in red."""
  peak = float(heat.max()) if heat.size else 0.0
  v = np.clip(heat / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(heat, np.float32)
  a = (alpha * v)[..., None]
  mixed = (1 - a) * image.astype(np.float32) + a * colormap(v).astype(np.float32)
  return label(Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8)), text)


def grid_picture(tiles: Sequence[Image.Image], title: str, columns: int = GRID_COLUMNS) -> Image.Image:
  """Tiles of one size in rows of `columns`, under a strip with `title`."""
  w, h = tiles[0].size
  cols = min(columns, len(tiles))
  rows = math.ceil(len(tiles) / cols)
  size = max(11, w // 18)
  font = _font(size)
  strip = size + size // 2 + 4
  out = Image.new("RGB", (cols * w, rows * h + strip), (255, 255, 255))
  ImageDraw.Draw(out).text((4, 2), title, font=font, fill=(0, 0, 0))
  for k, tile in enumerate(tiles):
    out.paste(tile, ((k % cols) * w, strip + (k // cols) * h))
  return out


def file_word(word: str) -> str:
  """A word as a file name's part: letters, digits, '_' and '-' only, at most 40 characters."""
  return re.sub(r"[^A-Za-z0-9_-]+", "_", word).strip("_")[:40] or "word"
