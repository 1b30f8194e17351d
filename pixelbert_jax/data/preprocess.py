"""Image preprocessing: decode any encoded image to uint8 RGB, resize, pad to a shape bucket.

Images stay uint8 all the way to the device (the model normalises there): a quarter of the host->device
traffic of float32, and the pipeline never has to agree with the model on mean/std.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# The paper's largest images are 800x1333 (~1.1M pixels); originals rarely exceed ~50M.
DEFAULT_MAX_PIXELS = 64_000_000


class BadImageError(ValueError):
  """An image that cannot be used; the message names the file and the reason."""


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
  """Any PIL mode -> uint8 [h, w, 3]. Transparency is composited over white (not dropped to black)."""
  mode = img.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
    # convert("L") would clip 16-bit values at 255 instead of scaling them.
    arr = np.asarray(img).astype(np.int64)
    if mode == "I" and arr.size and arr.max() <= 255 and arr.min() >= 0:
      gray = arr.astype(np.uint8)
    else:
      gray = (np.clip(arr, 0, 65535) // 257).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == "F":
    arr = np.asarray(img, dtype=np.float32)
    scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
    gray = np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      mode in ("P", "L", "RGB", "1") and "transparency" in img.info
  )
  if has_alpha:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(background, rgba)
  try:
    rgb = img.convert("RGB")
  except (ValueError, OSError) as e:
    raise BadImageError(f"{name}: cannot convert image mode {mode!r} to RGB ({e})") from e
  arr = np.asarray(rgb, dtype=np.uint8)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise BadImageError(f"{name}: mode {mode!r} converted to unexpected shape {arr.shape}")
  return arr


def decode_image(data: bytes, *, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes encoded image bytes (any format PIL reads) to uint8 RGB [h, w, 3], EXIF orientation applied.

  Raises BadImageError naming `name` for empty, truncated, undecodable, zero-sized images and for images
  with more than `max_pixels` pixels; the size check reads only the header, before any pixel is decoded.
  """
  if data is None or len(data) == 0:
    raise BadImageError(f"{name}: empty image (0 bytes)")
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    # Somebody flipped PIL's global; we must still see truncation, so refuse to run silently.
    raise BadImageError(f"{name}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated images would pass")
  try:
    img = Image.open(io.BytesIO(bytes(data)))
  except UnidentifiedImageError as e:
    raise BadImageError(
        f"{name}: not an image PIL can identify ({len(data)} bytes, " f"starts with {bytes(data[:8])!r})"
    ) from e
  except Image.DecompressionBombError as e:
    raise BadImageError(f"{name}: refused as a decompression bomb ({e})") from e
  except Exception as e:  # PIL plugins raise SyntaxError, struct.error, ... on broken headers.
    raise BadImageError(f"{name}: truncated or unreadable image header ({type(e).__name__}: {e})") from e
  width, height = img.size
  if width <= 0 or height <= 0:
    raise BadImageError(f"{name}: zero-sized image ({width}x{height})")
  if width * height > max_pixels:
    raise BadImageError(
        f"{name}: refused as a decompression bomb: {width}x{height} = {width * height} "
        f"pixels > max_pixels={max_pixels}"
    )
  try:
    img.load()
    img = ImageOps.exif_transpose(img)
  except Exception as e:  # truncated data surfaces as OSError, bad codecs as others
    raise BadImageError(
        f"{name}: truncated or corrupt {img.format or 'image'} data " f"({type(e).__name__}: {e})"
    ) from e
  return np.ascontiguousarray(_to_rgb(img, name))


def resized_shape(height: int, width: int, *, short_side: int, long_side: int) -> tuple[int, int]:
  """Shape after scaling the shorter side to `short_side` with the longer side at most `long_side`."""
  scale = min(short_side / min(height, width), long_side / max(height, width))
  return max(1, round(height * scale)), max(1, round(width * scale))


def choose_bucket(height: int, width: int, buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The smallest bucket (H, W) that holds an h x w image, preferring buckets of the same orientation.

  If no bucket holds the image, the largest bucket of the right orientation is returned and the caller
  must shrink the image into it (`fit_into`).
  """
  if not buckets:
    raise ValueError("no image buckets configured")
  landscape = width >= height
  same = [tuple(b) for b in buckets if (b[1] >= b[0]) == landscape or b[0] == b[1]]
  candidates = same or [tuple(b) for b in buckets]
  fitting = [b for b in candidates if b[0] >= height and b[1] >= width]
  if fitting:
    return min(fitting, key=lambda b: (b[0] * b[1], b))
  return max(candidates, key=lambda b: (min(b[0] / height, b[1] / width), b[0] * b[1]))


def fit_into(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
  """Shrinks (h, w), aspect kept, until it fits `bucket`; unchanged if it already fits."""
  scale = min(1.0, bucket[0] / height, bucket[1] / width)
  if scale >= 1.0:
    return height, width
  return min(bucket[0], max(1, int(height * scale))), min(bucket[1], max(1, int(width * scale)))


def resize_and_pad(
    image: np.ndarray,
    *,
    short_side: int,
    long_side: int,
    buckets: Sequence[Sequence[int]],
    bucket: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [h,w,3] -> (uint8 [H,W,3] top-left aligned with zeros in padding, bool [H,W] valid mask).

  `bucket` (H, W) forces the bucket the data plan chose (the image is shrunk into it if needed);
  without it the bucket is chosen here from `buckets`.
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"resize_and_pad expects uint8 [h,w,3], got {image.dtype} {image.shape}")
  h, w = resized_shape(image.shape[0], image.shape[1], short_side=short_side, long_side=long_side)
  bucket = tuple(bucket) if bucket is not None else choose_bucket(h, w, buckets)
  h, w = fit_into(h, w, bucket)
  if (h, w) != image.shape[:2]:
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC, reducing_gap=3.0))
  padded = np.zeros((bucket[0], bucket[1], 3), np.uint8)
  padded[:h, :w] = image
  mask = np.zeros((bucket[0], bucket[1]), bool)
  mask[:h, :w] = True
  return padded, mask


def validate_buckets(buckets: Sequence[Sequence[int]], *, stride: int = 64) -> list[tuple[int, int]]:
  """Buckets as (H, W) tuples; rejects any side not a positive multiple of the model's stride."""
  out = []
  for b in buckets:
    if len(b) != 2 or any(int(s) <= 0 or int(s) % stride for s in b):
      raise ValueError(f"image bucket {tuple(b)} must be (H, W) with both sides positive multiples of {stride}")
    out.append((int(b[0]), int(b[1])))
  if not out:
    raise ValueError("no image buckets configured")
  return out
