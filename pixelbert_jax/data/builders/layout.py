"""The stored layout of every build (layout 2): each image file stored once, records pointing at it by row.

A build has one split `images`, the image table: `image_bytes` (the original encoded file) and `image_file`
(its path in the manual dir, or a name for generated images). Every other split holds records (captions,
questions, statements) that name their image by its row in that table: `image_index` (captions, vqa
schemas) or `image0_index` / `image1_index` (nlvr2), plus the stored `height` / `width` of that image, so
that planning batches never reads an image. TFDS gives all splits of a build one set of features, so an
image row carries the record fields empty (and a record the table's): a few bytes per row.

Rows are known while building because a build is written in the order it is generated (TFDS's
`disable_shuffling`): split `images` first, each good image once, then the record splits.
`metadata.json` of the build says `layout: 2`, and `views`: splits that are read as the concatenation of
stored ones (COCO's `train` = `karpathy_train+restval`), so nothing is stored twice. The pipeline reads a
split through `open_split`, which joins each record with its image bytes under the keys the old layout
stored (`image`, or `image0` / `image1`); `tfds.data_source` alone reads the same files (records and the
`images` split separately).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

IMAGES_SPLIT = "images"
LAYOUT = 2
# record field holding an image's row -> the key its bytes get when a record is joined with its image
REFS = {"image_index": "image", "image0_index": "image0", "image1_index": "image1"}
TABLE_FIELDS = ("image_bytes", "image_file")
_KEY_SPACE = 1 << 128  # TFDS sorts int keys as its 128-bit hashes: spread them over that range


class OldLayoutError(ValueError):
  """A build in a layout this code does not read; the message names the folder and says to rebuild."""


def table_features() -> dict[str, tfds.features.FeatureConnector]:
  # tfds.features.Image fed bytes still round-trips through TensorFlow on read; a scalar object tensor
  # stores the encoded file untouched and reads back as Python bytes.
  return {"image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_), "image_file": tfds.features.Text()}


def ref_feature() -> tfds.features.FeatureConnector:
  return tfds.features.Scalar(dtype=np.int64)


def ordered_key(position: int, count: int) -> int:
  """The TFDS key that writes example `position` of `count` in that order (with `disable_shuffling`).

  TFDS sorts keys; past 1 GB per split it sorts them in 1000 buckets by key range, so keys 0..n-1 would
  all land in the first bucket and the whole split would be sorted in memory. Spread keys keep the buckets
  even.
  """
  if not 0 <= position < count:
    raise ValueError(f"position {position} outside [0, {count})")
  return position * (_KEY_SPACE // count)


def _blank_value(feature: tfds.features.FeatureConnector, key: str) -> Any:
  if isinstance(feature, tfds.features.Text):
    return ""
  if isinstance(feature, tfds.features.Sequence):
    return []
  if isinstance(feature, tfds.features.Tensor):
    if feature.np_dtype == np.object_:
      return b""
    return np.full(feature.shape, -1 if key in REFS else 0, feature.np_dtype)
  raise TypeError(f"no blank value for feature {key!r} of type {type(feature).__name__}")


def blank_example(features: tfds.features.FeaturesDict, keys: Sequence[str]) -> dict[str, Any]:
  """Empty values for `keys` of `features`: a record's table fields, or an image row's record fields."""
  return {k: _blank_value(features[k], k) for k in keys}


def metadata(*, views: dict[str, Sequence[str]] | None = None, left_out: dict[str, str] | None = None) -> dict:
  """What a build's metadata.json says: the layout, its views, and splits whose files were there but that
  were not built (VQA's test splits without `include_test_splits`), each with the file."""
  return {"layout": LAYOUT, "views": {k: list(v) for k, v in (views or {}).items()}, "left_out": left_out or {}}


# ---------------------------------------------------------------------------------------------- reading
def _meta(builder: tfds.core.DatasetBuilder) -> dict:
  return dict(builder.info.metadata or {})


def check_layout(builder: tfds.core.DatasetBuilder) -> None:
  """OldLayoutError unless `builder`'s build is in layout 2 (an image table and records pointing at it)."""
  meta = _meta(builder)
  has_table = IMAGES_SPLIT in builder.info.splits and any(k in builder.info.features.keys() for k in REFS)
  if meta.get("layout") != LAYOUT or not has_table:
    raise OldLayoutError(
        f"{builder.data_dir}: a build in layout {meta.get('layout', 1)}"
        f"{'' if has_table else ' (no image table)'}; this code reads layout {LAYOUT}, each image stored "
        "once: rebuild it (python -m pixelbert_jax.data.prepare, docs/real_datasets.md) and delete this folder"
    )


def views(builder: tfds.core.DatasetBuilder) -> dict[str, list[str]]:
  return {k: list(v) for k, v in _meta(builder).get("views", {}).items()}


def record_splits(builder: tfds.core.DatasetBuilder) -> list[str]:
  """The record splits a build can be read as: those stored (not the image table) and its views."""
  return sorted((set(builder.info.splits) - {IMAGES_SPLIT}) | set(views(builder)))


def num_records(builder: tfds.core.DatasetBuilder, split: str) -> int:
  parts = views(builder).get(split, [split])
  return sum(builder.info.splits[p].num_examples for p in parts)


def left_out_message(builder: tfds.core.DatasetBuilder, name: str, split: str) -> str | None:
  """Why `split` is not in the build when its file was there (it needed a flag), or None."""
  file = _meta(builder).get("left_out", {}).get(split)
  if file is None:
    return None
  return (
      f"dataset {name!r} was built without split {split!r} (its file {file} was there; test splits are "
      f"built only when asked for): rebuild with `python -m pixelbert_jax.data.prepare ... "
      f"--include_test_splits` after deleting {builder.data_dir}"
  )


def open_split(builder: tfds.core.DatasetBuilder, split: str, *, dataset: str) -> tuple[Any, "JoinedSource"]:
  """(records without images, records joined with their image bytes) of a record split or view."""
  check_layout(builder)
  if split == IMAGES_SPLIT:
    raise ValueError(f"dataset {dataset!r}: split {IMAGES_SPLIT!r} is the image table, not records")
  if split not in record_splits(builder):
    raise ValueError(
        left_out_message(builder, dataset, split)
        or f"dataset {dataset!r} has no split {split!r}; it has {record_splits(builder)}"
    )
  name = f"{dataset}/{split}"
  parts = views(builder).get(split, [split])
  records = builder.as_data_source("+".join(parts))
  images = builder.as_data_source(IMAGES_SPLIT)
  refs = tuple(k for k in REFS if k in builder.info.features.keys())
  return records, JoinedSource(records, images, refs, name=name)


class JoinedSource:
  """Random access (len, [i], __getitems__) to records with their image bytes: picklable for grain workers.

  `records` is the same split without image bytes, for readers that need only the text.
  """

  def __init__(self, records, images, refs: Sequence[str], *, name: str):
    self.records, self._images, self._refs, self._name = records, images, tuple(refs), name
    self._num_images = len(images)

  @property
  def images(self):
    """The build's image table (split 'images'; rows are what the records' `*_index` fields hold)."""
    return self._images

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    return self._join([int(index)], [self.records[int(index)]])[0]

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    indices = [int(i) for i in indices]
    return self._join(indices, list(self.records.__getitems__(indices)))

  def _join(self, indices: list[int], records: list) -> list[dict]:
    rows = []
    for i, record in zip(indices, records):
      for ref in self._refs:
        row = int(record[ref])
        if not 0 <= row < self._num_images:
          raise IndexError(
              f"{self._name}[{i}]: {ref} {row} outside the image table [0, {self._num_images}) of this "
              "build: the build is damaged; delete and rebuild it"
          )
        rows.append(row)
    images = self._images.__getitems__(rows) if rows else []
    out, k = [], 0
    for record in records:
      joined = {key: value for key, value in record.items() if key not in TABLE_FIELDS}
      for ref in self._refs:
        joined[REFS[ref]] = images[k]["image_bytes"]
        k += 1
      out.append(joined)
    return out


def build_folder_versions(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Other versions built beside this builder's version folder (old layouts), as folder paths."""
  parent = os.path.dirname(os.fspath(builder.data_dir))
  if not os.path.isdir(parent):
    return []
  found = []
  for entry in sorted(os.listdir(parent)):
    path = os.path.join(parent, entry)
    if entry == str(builder.version) or not os.path.isfile(os.path.join(path, "dataset_info.json")):
      continue
    try:
      tfds.core.Version(entry)
    except ValueError:
      continue
    found.append(path)
  return found


def warn_unfinished_builds(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Names, with their size, the `incomplete.*` folders TFDS left beside this builder's version folder: a
  build killed half-way leaves one, and each new build writes a new one beside it. They are named, not
  deleted: another process may be building the same dataset into one of them right now."""
  parent = os.path.dirname(os.fspath(builder.data_dir))
  if not os.path.isdir(parent):
    return []
  found = []
  for entry in sorted(os.listdir(parent)):
    path = os.path.join(parent, entry)
    if entry.startswith("incomplete.") and os.path.isdir(path):
      size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
      logging.warning(
          "%s: an unfinished build of %s (%.1f MB), left by a build that was stopped; delete it unless "
          "another process is building this dataset now",
          path,
          builder.name,
          size / 2**20,
      )
      found.append(path)
  return found
