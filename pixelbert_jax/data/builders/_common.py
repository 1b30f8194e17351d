"""What every real-data builder shares: the three stored schemas, record validation, image checks, bad-data tally.

Images are stored as the original encoded bytes (no TensorFlow needed to write or read them); decoding
happens in the pipeline. Builders check each image once here so that an empty or broken file is skipped
with a warning at build time instead of crashing a training worker later.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, UnidentifiedImageError

from pixelbert_jax.data.preprocess import DEFAULT_MAX_PIXELS, BadImageError, decode_image

log = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.01
VERIFY_MODES = ("decode", "header")
_EXIF_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


class RecordError(ValueError):
  """A record the builder does not understand; the message names the file, the record and the key."""


class TooManyBadRecordsError(ValueError):
  """More than the allowed fraction of a split was skipped. A ValueError, as bad input is: a training run that
  builds the dataset itself (main.py) then reports it on one `error:` line, as `prepare` does."""


# ---------------------------------------------------------------------------------------------- schemas
def image_bytes() -> tfds.features.FeatureConnector:
  # tfds.features.Image fed bytes still round-trips through TensorFlow on read; a scalar object tensor
  # stores the encoded file untouched and reads back as Python bytes.
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def captions_features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
      {
          "image": image_bytes(),
          "image_id": tfds.features.Text(),
          "captions": tfds.features.Sequence(tfds.features.Text()),
          "height": tfds.features.Scalar(dtype=np.int32),
          "width": tfds.features.Scalar(dtype=np.int32),
          **extra,
      }
  )


def vqa_features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
      {
          "image": image_bytes(),
          "image_id": tfds.features.Text(),
          "question_id": tfds.features.Scalar(dtype=np.int64),
          "question": tfds.features.Text(),
          "answers": tfds.features.Sequence(tfds.features.Text()),
          "question_type": tfds.features.Text(),
          "answer_type": tfds.features.Text(),
          "height": tfds.features.Scalar(dtype=np.int32),
          "width": tfds.features.Scalar(dtype=np.int32),
          **extra,
      }
  )


def nlvr2_features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
      {
          "identifier": tfds.features.Text(),
          "sentence": tfds.features.Text(),
          "label": tfds.features.Scalar(dtype=np.int32),
          "image0": image_bytes(),
          "image1": image_bytes(),
          "height0": tfds.features.Scalar(dtype=np.int32),
          "width0": tfds.features.Scalar(dtype=np.int32),
          "height1": tfds.features.Scalar(dtype=np.int32),
          "width1": tfds.features.Scalar(dtype=np.int32),
          **extra,
      }
  )


# ------------------------------------------------------------------------------------ record validation
def _type_names(types: type | tuple[type, ...]) -> str:
  types = types if isinstance(types, tuple) else (types,)
  return " or ".join(t.__name__ for t in types)


def field(record: Any, key: str, types: type | tuple[type, ...], *, file: str, where: str, default: Any = ...) -> Any:
  """record[key], checked to be an instance of `types`; RecordError naming file/record/key otherwise.

  `default` (when given) is returned for a missing key or a JSON null. bool is never accepted as int.
  """
  if not isinstance(record, dict):
    raise RecordError(f"{file}: record {where}: expected a JSON object, got {type(record).__name__}")
  if key not in record or (record[key] is None and default is not ...):
    if default is not ...:
      return default
    raise RecordError(f"{file}: record {where}: missing key {key!r} (keys present: {sorted(record)})")
  value = record[key]
  wanted = types if isinstance(types, tuple) else (types,)
  if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
    raise RecordError(
        f"{file}: record {where}: key {key!r} must be {_type_names(types)}, "
        f"got {type(value).__name__} {_short(value)}"
    )
  return value


def str_list(record: Any, key: str, *, file: str, where: str, default: Any = ...) -> list[str]:
  values = field(record, key, list, file=file, where=where, default=default)
  for i, v in enumerate(values):
    if not isinstance(v, str):
      raise RecordError(f"{file}: record {where}: key {key!r}[{i}] must be str, " f"got {type(v).__name__} {_short(v)}")
  return values


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def load_json(path: str) -> Any:
  """Whole-file JSON, with the file named in the error (json's own errors only give line/column)."""
  try:
    with open(path, "rb") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise RecordError(f"{path}: not valid JSON ({e})") from e


def iter_json_lines(path: str) -> Iterator[tuple[int, dict]]:
  """(1-based line number, object) for each non-blank line of a JSON-lines file."""
  with open(path, "r", encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError(f"{path}: line {line_no}: not valid JSON ({e})") from e
      if not isinstance(record, dict):
        raise RecordError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}")
      yield line_no, record


def top_level(data: Any, key: str, *, file: str) -> list:
  """data[key] of a JSON file whose top level must be an object holding a list under `key`."""
  if not isinstance(data, dict) or key not in data:
    got = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
    raise RecordError(f"{file}: expected a top-level object with key {key!r}, got {got}")
  if not isinstance(data[key], list):
    raise RecordError(f"{file}: key {key!r} must be a list, got {type(data[key]).__name__}")
  return data[key]


def clean_texts(texts: Iterable[str], *, tally: "BadRecordTally", name: str, dedupe: bool = False) -> list[str]:
  """Stripped non-empty texts; each empty one is dropped with a counted warning."""
  kept, seen = [], set()
  for text in texts:
    text = text.strip()
    if not text:
      tally.drop_text(name)
      continue
    if dedupe:
      if text in seen:
        continue
      seen.add(text)
    kept.append(text)
  return kept


# ------------------------------------------------------------------------------------------- images
class ImageChecker:
  """Reads image files and checks each path once (VQA and NLVR2 reuse one image for many records).

  verify='decode' decodes every pixel with the pipeline's own decode_image (catches truncated files);
  'header' only parses the header (several times faster; truncation then surfaces in the pipeline).
  """

  def __init__(self, verify: str = "decode", max_pixels: int = DEFAULT_MAX_PIXELS):
    if verify not in VERIFY_MODES:
      raise ValueError(f"verify_images must be one of {VERIFY_MODES}, got {verify!r}")
    self.verify, self.max_pixels = verify, max_pixels
    self._cache: dict[str, tuple[int, int] | str] = {}

  def read(self, path: str) -> tuple[bytes, int, int]:
    """(encoded bytes, height, width as displayed, i.e. after EXIF rotation); BadImageError if unusable."""
    cached = self._cache.get(path)
    if isinstance(cached, str):
      raise BadImageError(cached)
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      self._cache[path] = message = f"{path}: cannot read ({e.strerror or e})"
      raise BadImageError(message) from e
    if cached is None:
      try:
        cached = self._check(data, path)
      except BadImageError as e:
        self._cache[path] = str(e)
        raise
      self._cache[path] = cached
    return data, cached[0], cached[1]

  def _check(self, data: bytes, path: str) -> tuple[int, int]:
    if self.verify == "decode":
      array = decode_image(data, name=path, max_pixels=self.max_pixels)
      return int(array.shape[0]), int(array.shape[1])
    if not data:
      raise BadImageError(f"{path}: empty image (0 bytes)")
    try:
      img = Image.open(io.BytesIO(data))
      width, height = img.size
      orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
      raise BadImageError(f"{path}: not an image PIL can identify ({e})") from e
    except Exception as e:  # broken headers raise SyntaxError, struct.error, OSError, ...
      raise BadImageError(f"{path}: unreadable image header ({type(e).__name__}: {e})") from e
    if width <= 0 or height <= 0:
      raise BadImageError(f"{path}: zero-sized image ({width}x{height})")
    if width * height > self.max_pixels:
      raise BadImageError(
          f"{path}: refused as a decompression bomb: {width}x{height} pixels " f"> max_pixels={self.max_pixels}"
      )
    return (width, height) if orientation in _SWAPS_AXES else (height, width)


# ---------------------------------------------------------------------------------- bad-data tally
class BadRecordTally:
  """Counts what one split skipped; fails the build when more than `max_fraction` of records were bad."""

  def __init__(self, split: str, max_fraction: float, *, show: int = 5):
    if not 0.0 <= max_fraction <= 1.0:
      raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_fraction}")
    self.split, self.max_fraction, self.show = split, max_fraction, show
    self.total = self.skipped = self.dropped_texts = 0
    self.first: list[str] = []

  def skip(self, name: str, reason: str) -> None:
    self.skipped += 1
    what = reason if reason.startswith(name) else f"{name}: {reason}"  # image errors start with the path
    if len(self.first) < self.show:
      self.first.append(what)
    if self.skipped <= 20 or self.skipped % 1000 == 0:  # keep a million-record build's log readable
      log.warning("split %s: skipping %s (%d skipped so far)", self.split, what, self.skipped)

  def drop_text(self, name: str) -> None:
    self.dropped_texts += 1
    if self.dropped_texts <= 20 or self.dropped_texts % 1000 == 0:
      log.warning("split %s: dropping an empty text of %s (%d dropped so far)", self.split, name, self.dropped_texts)

  def finish(self) -> None:
    if self.skipped or self.dropped_texts:
      log.warning(
          "split %s: skipped %d of %d records, dropped %d empty texts",
          self.split,
          self.skipped,
          self.total,
          self.dropped_texts,
      )
    if self.total == 0:
      raise TooManyBadRecordsError(f"split {self.split}: no records found")
    if self.skipped > self.max_fraction * self.total:
      raise TooManyBadRecordsError(
          f"split {self.split}: {self.skipped} of {self.total} records skipped "
          f"({self.skipped / self.total:.1%} > max_bad_fraction={self.max_fraction:g}); first: " + "; ".join(self.first)
      )


def generate(
    items: Iterable[tuple[str, Any]], make: Callable[[Any], tuple[str, dict] | None], tally: BadRecordTally
) -> Iterator[tuple[str, dict]]:
  """Runs `make` on each (name, payload); BadImageError skips that record (counted), RecordError stops.

  `make` returns (key, example), or None for a record it skipped itself (having told the tally).
  """
  for name, payload in items:
    tally.total += 1
    try:
      made = make(payload)
    except BadImageError as e:
      tally.skip(name, str(e))
      continue
    if made is not None:
      yield made
  tally.finish()


def check_unique(seen: set, key: Any, *, file: str, where: str, what: str) -> None:
  if key in seen:
    raise RecordError(f"{file}: record {where}: duplicate {what} {key!r}")
  seen.add(key)


def require_file(path: str, *, hint: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found. {hint}")
  return path


def first_existing_dir(candidates: Iterable[str], *, what: str, hint: str) -> str:
  candidates = list(candidates)
  for d in candidates:
    if os.path.isdir(d):
      return d
  raise FileNotFoundError(f"no {what} folder found; looked for {candidates}. {hint}")


# ---------------------------------------------------------------------------------------- the builder
class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders: manual_dir input, ArrayRecord output, bad-data knobs, per-split tallies."""

  def __init__(
      self,
      *,
      max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
      verify_images: str = "decode",
      max_pixels: int = DEFAULT_MAX_PIXELS,
      **kwargs: Any,
  ):
    kwargs.setdefault("file_format", "array_record")
    self.max_bad_fraction = max_bad_fraction
    self.images = ImageChecker(verify_images, max_pixels)
    self.tallies: dict[str, BadRecordTally] = {}
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's default resolves the path through `importlib_resources`, a package it does not install.
    return epath.Path(sys.modules[cls.__module__].__file__)

  def tally(self, split: str) -> BadRecordTally:
    self.tallies[split] = BadRecordTally(split, self.max_bad_fraction)
    return self.tallies[split]

  def manual_path(self, dl_manager: tfds.download.DownloadManager) -> str:
    return os.fspath(dl_manager.manual_dir)
