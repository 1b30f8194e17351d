"""Visual Genome region descriptions as captions: one example per image, its region phrases as captions.

region_descriptions.json is about 700 MB; it is read as a stream (one image's record at a time,
_read.iter_json_array), since json.load of it peaks at several GB (bench/vg_memory.py).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator
from urllib.parse import urlparse

import tensorflow_datasets as tfds

from pixelbert_jax.data.builders import _common as c
from pixelbert_jax.data.builders import _read as read
from pixelbert_jax.data.schemas import SCHEMAS

log = logging.getLogger(__name__)
IMAGE_FOLDERS = ("VG_100K", "VG_100K_2", "images")


class VisualGenomeRegions(c.ManualBuilder):
  """Visual Genome v1.2 region descriptions: split 'train' holds every image (the paper uses all of VG).

  Captions are the image's region phrases, stripped, exact duplicates removed, order kept.
  """

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Original encoded images, region phrases as captions.",
      "2.0.0": "Layout 2: images in split 'images', records point at them; JSON read as a stream.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put into manual_dir:
    region_descriptions.json   [{{"id", "regions": [{{"image_id", "phrase", "x", "y", "width", "height"}}]}}]
    image_data.json            optional: [{{"image_id", "url", "width", "height", "coco_id"}}]; its url
                               says which folder holds each image
    VG_100K/*.jpg, VG_100K_2/*.jpg   (images.zip and images2.zip; without image_data.json each image
                               is looked up as <id>.jpg in {IMAGE_FOLDERS})
  """

  def __init__(self, *, exclude_coco_heldout: str | None = None, **kwargs: Any):
    """exclude_coco_heldout: a dataset_coco.json; VG images that are COCO Karpathy val/test images (by
    image_data.json's coco_id) are left out, so that pre-training never sees retrieval test images."""
    self.exclude_coco_heldout = exclude_coco_heldout
    self.excluded = 0
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(
        SCHEMAS["captions"].features(), homepage="https://homes.cs.washington.edu/~ranjay/visualgenome/"
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual_dir = self.manual_path(dl_manager)
    regions_path = read.require_file(
        os.path.join(manual_dir, "region_descriptions.json"), hint=self.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
    data_path = os.path.join(manual_dir, "image_data.json")
    relpaths, coco_ids = read_image_data(data_path) if os.path.isfile(data_path) else ({}, {})
    images = read_regions(regions_path)
    if self.exclude_coco_heldout:
      if not coco_ids:
        raise FileNotFoundError(f"{data_path} (with coco_id) is needed to exclude COCO held-out images")
      heldout = coco_heldout_ids(self.exclude_coco_heldout)
      kept = [im for im in images if coco_ids.get(im[0]) not in heldout]
      self.excluded = len(images) - len(kept)
      log.info("excluded %d Visual Genome images that are COCO Karpathy val/test images", self.excluded)
      images = kept
    table = self.start_table(manual_dir)

    def locate(image_id: int) -> str:
      if image_id in relpaths:
        return os.path.join(manual_dir, relpaths[image_id])
      candidates = [os.path.join(manual_dir, d, f"{image_id}.jpg") for d in IMAGE_FOLDERS]
      return next((p for p in candidates if os.path.isfile(p)), candidates[0])

    items = [(image_id, phrases, table.add(locate(image_id))) for image_id, phrases in images]
    return self.with_table({"train": self._generate_examples(items)})

  def _generate_examples(self, items: list[tuple[int, str, str]]) -> Iterator[tuple[int, dict]]:
    def make(item: tuple[int, str, str], tally: c.BadRecordTally) -> dict | None:
      image_id, phrases, path = item
      captions = c.clean_texts(json.loads(phrases), tally=tally, name=path, dedupe=True)
      if not captions:
        tally.skip(path, "no non-empty region phrase")
        return None
      row, height, width = self.table.row(path)
      return {"image_index": row, "image_id": str(image_id), "captions": captions, "height": height, "width": width}

    return self.records("train", [(item[2], item) for item in items], make)


def read_regions(path: str) -> list[tuple[int, str]]:
  """[(image id, its phrases as one JSON list)] from region_descriptions.json, validated, read one image's
  record at a time. One string per image instead of a list of 50: 5.4M string objects would hold ~350 MB
  more until the records are written (bench/vg_memory.py)."""
  images, seen = [], set()
  for i, rec in read.iter_json_array(path):
    key = "id" if isinstance(rec, dict) and "id" in rec else "image_id"  # v1.0 files say image_id
    image_id = read.field(rec, key, int, file=path, where=f"[{i}]")
    where = f"[{i}] (image {image_id})"
    read.check_unique(seen, image_id, file=path, where=where, what="image id")
    regions = read.field(rec, "regions", list, file=path, where=where)
    phrases = [read.field(r, "phrase", str, file=path, where=f"{where} regions[{j}]") for j, r in enumerate(regions)]
    images.append((image_id, json.dumps(phrases, ensure_ascii=False)))
  return images


def read_image_data(path: str) -> tuple[dict[int, str], dict[int, int]]:
  """(image id -> path relative to manual_dir, from the url's folder/file; image id -> COCO id)."""
  relpaths, coco_ids = {}, {}
  for i, rec in read.iter_json_array(path):
    key = "image_id" if isinstance(rec, dict) and "image_id" in rec else "id"
    image_id = read.field(rec, key, int, file=path, where=f"[{i}]")
    url = read.field(rec, "url", str, file=path, where=f"[{i}] (image {image_id})")
    parts = [p for p in urlparse(url).path.split("/") if p]
    if len(parts) < 2:
      raise read.RecordError(
          f"{path}: record [{i}] (image {image_id}): key 'url' must end in FOLDER/FILE, " f"got {url!r}"
      )
    relpaths[image_id] = os.path.join(parts[-2], parts[-1])
    coco_id = read.field(rec, "coco_id", int, file=path, where=f"[{i}] (image {image_id})", default=None)
    if coco_id is not None:
      coco_ids[image_id] = coco_id
  return relpaths, coco_ids


def coco_heldout_ids(karpathy_json: str) -> set[int]:
  """COCO ids of the Karpathy val and test images."""
  heldout = set()
  for i, rec in enumerate(read.top_level(read.load_json(karpathy_json), "images", file=karpathy_json)):
    if read.field(rec, "split", str, file=karpathy_json, where=f"images[{i}]") in ("val", "test"):
      heldout.add(read.field(rec, "cocoid", int, file=karpathy_json, where=f"images[{i}]"))
  return heldout
