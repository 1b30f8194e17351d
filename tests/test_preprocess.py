"""decode_image edge cases, resize and bucket padding."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pixelbert_jax.data.preprocess import (
    BadImageError,
    choose_bucket,
    decode_image,
    resize_and_pad,
    resized_shape,
    validate_buckets,
)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _gradient(h=24, w=32):
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 77)], -1).astype(np.uint8)


def test_rgb_png_roundtrip_exact():
  arr = _gradient()
  out = decode_image(_encode(Image.fromarray(arr), "PNG"), name="a.png")
  assert out.dtype == np.uint8 and out.shape == (24, 32, 3)
  np.testing.assert_array_equal(out, arr)


def test_grayscale_becomes_three_equal_channels():
  gray = _gradient()[..., 0]
  out = decode_image(_encode(Image.fromarray(gray, "L"), "PNG"), name="g.png")
  assert out.shape == (24, 32, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_composited_over_white():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
  out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), name="t.png")
  np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(out[3, 3], [255, 255, 255])


def test_cmyk_jpeg():
  img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
  out = decode_image(_encode(img, "JPEG", quality=95), name="c.jpg")
  assert out.shape == (8, 16, 3)
  r, g, b = out.reshape(-1, 3).mean(0)
  assert r > 200 and g < 50 and b < 50, (r, g, b)


def test_16bit_png_is_scaled_not_clipped():
  ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024  # up to 64512
  img = Image.fromarray(ramp)  # 'I;16'
  data = _encode(img, "PNG")
  out = decode_image(data, name="deep.png")
  expected = (ramp.astype(np.int64) // 257).astype(np.uint8)
  np.testing.assert_array_equal(out[..., 0], expected)
  assert out.max() > 200  # clipping at 255 would make almost everything 255


def test_palette_png():
  arr = _gradient()
  img = Image.fromarray(arr).convert("P", palette=Image.ADAPTIVE, colors=16)
  out = decode_image(_encode(img, "PNG"), name="p.png")
  np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_exif_rotated_jpeg():
  arr = np.zeros((10, 30, 3), np.uint8)
  arr[:, :10] = 255  # bright left third
  img = Image.fromarray(arr)
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 CW on display
  out = decode_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()), name="r.jpg")
  assert out.shape == (30, 10, 3)
  assert out[:10].mean() > 200 and out[20:].mean() < 50  # bright part is now on top


@pytest.mark.parametrize("shape", [(1, 2000), (2000, 1)])
def test_extreme_aspect_ratios(shape):
  arr = np.full(shape + (3,), 128, np.uint8)
  out = decode_image(_encode(Image.fromarray(arr), "PNG"), name="thin.png")
  assert out.shape == shape + (3,)
  buckets = [(192, 256), (256, 192), (192, 192)]
  padded, mask = resize_and_pad(out, short_side=192, long_side=256, buckets=buckets)
  assert padded.shape[:2] in buckets and mask.shape == padded.shape[:2]
  assert 1 <= mask.sum() <= padded.shape[0] * padded.shape[1]
  assert not padded[~mask].any()


def test_truncated_jpeg():
  rng = np.random.default_rng(0)
  noisy = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)  # big body, so the cut misses the header
  data = _encode(Image.fromarray(noisy), "JPEG", quality=90)
  with pytest.raises(BadImageError, match="cut.jpg: truncated or corrupt JPEG"):
    decode_image(data[: len(data) // 2], name="cut.jpg")
  with pytest.raises(BadImageError, match="head.jpg: truncated"):
    decode_image(data[:40], name="head.jpg")


def test_zero_bytes():
  with pytest.raises(BadImageError, match="empty.jpg.*0 bytes"):
    decode_image(b"", name="empty.jpg")


def test_not_an_image():
  with pytest.raises(BadImageError, match="notes.txt.*not an image"):
    decode_image(b"hello, this is text and not pixels\n" * 10, name="notes.txt")


def _png_with_header_size(width: int, height: int) -> bytes:
  """A tiny real PNG whose IHDR claims width x height: a decompression bomb's header."""
  data = bytearray(_encode(Image.new("1", (8, 8)), "PNG"))
  ihdr_start = 8 + 8  # signature, then length + type of the IHDR chunk
  data[ihdr_start : ihdr_start + 8] = struct.pack(">II", width, height)
  crc = zlib.crc32(bytes(data[12 : ihdr_start + 13]))
  data[ihdr_start + 13 : ihdr_start + 17] = struct.pack(">I", crc)
  return bytes(data)


def test_decompression_bomb_refused_before_decoding():
  bomb = _png_with_header_size(40_000, 40_000)
  with pytest.raises(BadImageError, match="bomb.png.*decompression bomb"):
    decode_image(bomb, name="bomb.png", max_pixels=50_000_000)
  with pytest.raises(BadImageError, match="small.png.*100 pixels > max_pixels=99"):
    decode_image(_encode(Image.new("RGB", (10, 10)), "PNG"), name="small.png", max_pixels=99)


def test_resized_shape_paper_sizes():
  assert resized_shape(480, 640, short_side=800, long_side=1333) == (800, 1067)
  assert resized_shape(300, 1000, short_side=800, long_side=1333) == (400, 1333)
  assert resized_shape(640, 480, short_side=600, long_side=1000) == (800, 600)


def test_choose_bucket_smallest_right_orientation():
  buckets = [(832, 1344), (1344, 832), (832, 1088), (1088, 832), (832, 832)]
  assert choose_bucket(800, 1067, buckets) == (832, 1088)
  assert choose_bucket(1067, 800, buckets) == (1088, 832)
  assert choose_bucket(800, 800, buckets) == (832, 832)
  assert choose_bucket(400, 1333, buckets) == (832, 1344)


def test_resize_and_pad_mask_and_alignment():
  arr = np.full((100, 150, 3), 9, np.uint8)
  padded, mask = resize_and_pad(arr, short_side=128, long_side=192, buckets=[(128, 192), (192, 128)])
  assert padded.shape == (128, 192, 3) and padded.dtype == np.uint8 and mask.dtype == bool
  assert mask[:128, :192].all()
  arr = np.full((100, 300, 3), 9, np.uint8)
  padded, mask = resize_and_pad(arr, short_side=128, long_side=192, buckets=[(128, 192), (192, 128)])
  assert mask.sum() == 64 * 192 and mask[:64].all() and not mask[64:].any()
  assert (padded[:64] == 9).all() and not padded[64:].any()


def test_validate_buckets_rejects_non_multiples():
  assert validate_buckets([[192, 256]]) == [(192, 256)]
  with pytest.raises(ValueError, match=r"\(200, 256\)"):
    validate_buckets([(200, 256)])
