"""What every real-data builder shares while building: image checks, the image table, the bad-data tally and
the `ManualBuilder` base class. Reading and validating the downloaded files is `_read.py`; the record
fields of each schema are `data/schemas.py`.

Images are stored as the original encoded bytes (no TensorFlow needed to write or read them), each file once
per build in split `images` (layout.py); decoding happens in the pipeline. Builders check each image once
here so that an empty or broken file is skipped with a warning at build time instead of crashing a training
worker later.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, UnidentifiedImageError

from pixelbert_jax.data.builders import layout
from pixelbert_jax.data.preprocess import DEFAULT_MAX_PIXELS, BadImageError, decode_image

log = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.01
VERIFY_MODES = ("decode", "header")
_EXIF_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


class TooManyBadRecordsError(ValueError):
  """More than the allowed fraction of a split was skipped. A ValueError, as bad input is: a training run that
  builds the dataset itself (main.py) then reports it on one `error:` line, as `prepare` does."""


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

  def error(self, path: str) -> str | None:
    """Why `path` was found unusable, or None if it was not (or not yet read)."""
    cached = self._cache.get(path)
    return cached if isinstance(cached, str) else None

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
    items: Sequence[tuple[str, Any]],
    make: Callable[[Any], dict | None],
    tally: BadRecordTally,
    blank: dict[str, Any],
) -> Iterator[tuple[int, dict]]:
  """Runs `make` on each (name, payload); BadImageError skips that record (counted), RecordError stops.

  `make` returns the record's fields, or None for a record it skipped itself (having told the tally); the
  image table's fields are added empty (`blank`). Keys keep the order of `items` (layout.ordered_key).
  """
  items = list(items)
  for position, (name, payload) in enumerate(items):
    tally.total += 1
    try:
      made = make(payload)
    except BadImageError as e:
      tally.skip(name, str(e))
      continue
    if made is not None:
      yield layout.ordered_key(position, len(items)), {**blank, **made}
  tally.finish()


class ImageTable:
  """The distinct image files a build's records name, each written once as split `images` (layout.py).

  A builder `add`s every file a record names while it reads the annotations, returns `generate()` as its
  first split, and takes each record's image row and stored size from `row(path)`. TFDS writes the splits
  in the order `_split_generators` returns them, so the table is complete before any record split is
  generated; `row` raises instead of guessing if that ever changes.
  """

  def __init__(self, checker: ImageChecker, root: str, features: tfds.features.FeaturesDict):
    self._checker, self._root = checker, os.path.abspath(root)
    self._blank = layout.blank_example(features, [k for k in features.keys() if k not in layout.TABLE_FIELDS])
    self._paths: dict[str, None] = {}  # insertion-ordered set
    self._rows: dict[str, tuple[int, int, int]] = {}
    self._complete = False

  def add(self, path: str) -> str:
    self._paths.setdefault(path, None)
    return path

  def __len__(self) -> int:
    return len(self._paths)

  def file_name(self, path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), self._root)
    return path if rel.startswith(os.pardir) else rel

  def generate(self, tally: BadRecordTally) -> Iterator[tuple[int, dict]]:
    paths = list(self._paths)
    if not paths:
      raise TooManyBadRecordsError(
          f"split {layout.IMAGES_SPLIT}: no record of any split names an image (are the annotation files empty?)"
      )
    for position, path in enumerate(paths):
      tally.total += 1
      try:
        data, height, width = self._checker.read(path)
      except BadImageError as e:
        tally.skip(path, str(e))
        continue
      self._rows[path] = (len(self._rows), height, width)
      yield layout.ordered_key(position, len(paths)), {
          **self._blank,
          "image_bytes": data,
          "image_file": self.file_name(path),
      }
    self._complete = True
    tally.finish()
    if not self._rows:
      raise TooManyBadRecordsError(
          f"split {layout.IMAGES_SPLIT}: none of the {len(paths)} image files is usable; first: "
          + "; ".join(tally.first)
      )

  def row(self, path: str) -> tuple[int, int, int]:
    """(row in the table, height, width) of `path`'s image; BadImageError (its reason) if it was skipped."""
    if not self._complete:
      raise RuntimeError(f"a record split was generated before split {layout.IMAGES_SPLIT!r} was complete")
    if path not in self._rows:
      if path not in self._paths:
        raise RuntimeError(f"{path}: not added to the image table before the splits were generated")
      raise BadImageError(self._checker.error(path) or f"{path}: unusable image")
    return self._rows[path]


# ---------------------------------------------------------------------------------------- the builder
class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders: manual_dir input, ArrayRecord output in layout 2 (an image table and record splits
  pointing at it, layout.py), bad-data knobs, per-split tallies, test splits only when asked for."""

  TEST_SPLITS: tuple[str, ...] = ()  # splits built only with include_test_splits (unannotated, large)

  def __init__(
      self,
      *,
      max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
      verify_images: str = "decode",
      max_pixels: int = DEFAULT_MAX_PIXELS,
      include_test_splits: bool = False,
      **kwargs: Any,
  ):
    kwargs.setdefault("file_format", "array_record")
    self.max_bad_fraction = max_bad_fraction
    self.include_test_splits = bool(include_test_splits)
    self.images = ImageChecker(verify_images, max_pixels)
    self.tallies: dict[str, BadRecordTally] = {}
    self.table: ImageTable | None = None
    self._left_out: dict[str, str] = {}
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's default resolves the path through `importlib_resources`, a package it does not install.
    return epath.Path(sys.modules[cls.__module__].__file__)

  def dataset_info(self, features: tfds.features.FeaturesDict, **kwargs: Any) -> tfds.core.DatasetInfo:
    # disable_shuffling: splits are written in the order generated, which is how records know image rows.
    return tfds.core.DatasetInfo(
        builder=self,
        features=features,
        description=self.__doc__,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
        **kwargs,
    )

  def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None, **kwargs: Any):
    if not self.data_path.exists():
      old = layout.build_folder_versions(self)
      manual = download_config.manual_dir if download_config else None
      if old and not (manual and os.path.isdir(manual) and os.listdir(manual)):
        raise layout.OldLayoutError(
            f"{old[-1]}: a build of {self.name} in an old layout (version {os.path.basename(old[-1])}; "
            f"this code reads {self.version}, each image stored once): rebuild it from the downloaded files "
            f"(python -m pixelbert_jax.data.prepare --dataset ... --manual_dir ..., or config.data.manual_dir), "
            "then delete the old folder"
        )
      for path in old:
        log.warning("%s: a build in an old layout, not read (this code builds %s); delete it", path, self.version)
      layout.warn_unfinished_builds(self)
    return super().download_and_prepare(download_config=download_config, **kwargs)

  def tally(self, split: str, max_fraction: float | None = None) -> BadRecordTally:
    self.tallies[split] = BadRecordTally(split, self.max_bad_fraction if max_fraction is None else max_fraction)
    return self.tallies[split]

  def manual_path(self, dl_manager: tfds.download.DownloadManager) -> str:
    return os.fspath(dl_manager.manual_dir)

  def start_table(self, root: str) -> ImageTable:
    """A new image table; image paths inside `root` are stored relative to it."""
    self.table = ImageTable(self.images, root, self.info.features)
    return self.table

  def wants(self, split: str, file: str) -> bool:
    """Whether to build `split` (whose file is there): a test split only with include_test_splits."""
    if split in self.TEST_SPLITS and not self.include_test_splits:
      self._left_out[split] = file
      log.info("not building split %s (%s): test splits are built with include_test_splits", split, file)
      return False
    return True

  def with_table(self, splits: dict[str, Any], *, views: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Split `images` followed by the record splits, and the build's metadata (layout.metadata)."""
    self.info.metadata.update(layout.metadata(views=views, left_out=self._left_out))
    # Bad images are counted here and again in every split whose records name them; those splits'
    # max_bad_fraction decides, so the table's own tally only fails when no image at all is usable.
    table_tally = self.tally(layout.IMAGES_SPLIT, max_fraction=1.0)
    return {layout.IMAGES_SPLIT: self.table.generate(table_tally), **splits}

  def records(
      self, split: str, items: Sequence[tuple[str, Any]], make: Callable[[Any, BadRecordTally], dict | None]
  ) -> Iterator[tuple[int, dict]]:
    """Split `split`'s records: `make(payload, tally)` on each (name, payload) of `items`, as `generate` does."""
    tally = self.tally(split)
    blank = layout.blank_example(self.info.features, layout.TABLE_FIELDS)
    return generate(items, lambda payload: make(payload, tally), tally, blank)
