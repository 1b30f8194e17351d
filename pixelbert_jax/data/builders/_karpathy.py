"""Andrej Karpathy's caption split files (dataset_coco.json, dataset_flickr30k.json), shared by two builders.

Format: {"images": [{"filepath"?, "filename", "split": train|restval|val|test, "sentences": [{"raw", ...}],
"cocoid"?}]}. Splits written: each part that has images. When there is a restval part, Karpathy's own train
part is stored as 'karpathy_train' and 'train' (what the paper pre-trains on) is the view
'karpathy_train+restval' (layout.py): read as both, stored once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import tensorflow_datasets as tfds

from pixelbert_jax.data.builders import _common as c
from pixelbert_jax.data.builders import _read as read
from pixelbert_jax.data.schemas import SCHEMAS

KARPATHY_PARTS = ("train", "restval", "val", "test")


@dataclasses.dataclass(frozen=True)
class KarpathyImage:
  image_id: str
  path: str
  captions: tuple[str, ...]
  part: str


def read_karpathy(json_path: str, builder: "KarpathyBuilder", manual_dir: str) -> list[KarpathyImage]:
  records = read.top_level(read.load_json(json_path), "images", file=json_path)
  images, seen_ids = [], set()
  for i, rec in enumerate(records):
    filename = read.field(rec, "filename", str, file=json_path, where=f"images[{i}]")
    where = f"images[{i}] ({filename})"
    part = read.field(rec, "split", str, file=json_path, where=where)
    if part not in KARPATHY_PARTS:
      raise read.RecordError(
          f"{json_path}: record {where}: key 'split' must be one of {KARPATHY_PARTS}, " f"got {part!r}"
      )
    sentences = read.field(rec, "sentences", list, file=json_path, where=where)
    raws = tuple(
        read.field(s, "raw", str, file=json_path, where=f"{where} sentences[{j}]") for j, s in enumerate(sentences)
    )
    image_id = builder.image_id(rec, filename, file=json_path, where=where)
    read.check_unique(seen_ids, image_id, file=json_path, where=where, what="image id")
    path = builder.image_path(rec, filename, manual_dir, file=json_path, where=where)
    images.append(KarpathyImage(image_id, path, raws, part))
  return images


def karpathy_splits(images: list[KarpathyImage]) -> tuple[dict[str, list[KarpathyImage]], dict[str, list[str]]]:
  """(stored splits, views): with a restval part, 'train' is the view karpathy_train + restval."""
  parts = {p: [im for im in images if im.part == p] for p in KARPATHY_PARTS}
  if parts["restval"]:
    stored = {"karpathy_train": parts["train"], "restval": parts["restval"]}
    views = {"train": [name for name, split in stored.items() if split]}
  else:
    stored, views = {"train": parts["train"]}, {}
  stored.update(val=parts["val"], test=parts["test"])
  return {name: split for name, split in stored.items() if split}, views


class KarpathyBuilder(c.ManualBuilder, skip_registration=True):
  """Captions schema from a Karpathy split file; subclasses say where the file and the images are."""

  JSON_NAME: str = ""

  def image_id(self, rec: dict, filename: str, *, file: str, where: str) -> str:
    return os.path.splitext(filename)[0]

  def image_path(self, rec: dict, filename: str, manual_dir: str, *, file: str, where: str) -> str:
    raise NotImplementedError

  def prepare_layout(self, manual_dir: str) -> None:
    """Hook to locate image folders once, before records are read."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(SCHEMAS["captions"].features(), homepage=self.HOMEPAGE)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual_dir = self.manual_path(dl_manager)
    candidates = [
        os.path.join(manual_dir, self.JSON_NAME),
        os.path.join(manual_dir, "caption_datasets", self.JSON_NAME),
    ]
    json_path = next((p for p in candidates if os.path.isfile(p)), None)
    if json_path is None:
      raise FileNotFoundError(
          f"{self.JSON_NAME} not found; looked for {candidates}. " f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    self.prepare_layout(manual_dir)
    splits, views = karpathy_splits(read_karpathy(json_path, self, manual_dir))
    table = self.start_table(manual_dir)
    for images in splits.values():
      for im in images:
        table.add(im.path)
    return self.with_table(
        {name: self._generate_examples(name, images) for name, images in splits.items()}, views=views
    )

  def _generate_examples(self, split: str, images: list[KarpathyImage]) -> Iterator[tuple[int, dict]]:
    def make(im: KarpathyImage, tally: c.BadRecordTally) -> dict | None:
      captions = c.clean_texts(im.captions, tally=tally, name=im.path)
      if not captions:
        tally.skip(im.path, "no non-empty caption")
        return None
      row, height, width = self.table.row(im.path)
      return {"image_index": row, "image_id": im.image_id, "captions": captions, "height": height, "width": width}

    return self.records(split, [(im.path, im) for im in images], make)
