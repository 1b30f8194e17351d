"""COCO captions with Karpathy's split, from the user's dataset_coco.json and COCO 2014 image folders.

TFDS ships `coco_captions` with the same split, but reading it needs TensorFlow; this one does not.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from pixelbert_jax.data.builders import _read as read
from pixelbert_jax.data.builders._karpathy import KarpathyBuilder


class CocoKarpathy(KarpathyBuilder):
  """MS-COCO 2014 captions, Karpathy split: train (= train + restval), karpathy_train, restval, val, test."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Original encoded images, raw captions, Karpathy split.",
      "2.0.0": "Layout 2: each image stored once (split 'images'), records point at it; 'train' a view.",
  }
  HOMEPAGE = "https://cocodataset.org"
  JSON_NAME = "dataset_coco.json"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into manual_dir:
    dataset_coco.json   (from Karpathy's caption_datasets.zip; caption_datasets/dataset_coco.json also works)
    train2014/COCO_train2014_*.jpg
    val2014/COCO_val2014_*.jpg
  Each image's folder is its 'filepath' in dataset_coco.json.
  """

  def image_id(self, rec: dict, filename: str, *, file: str, where: str) -> str:
    cocoid = read.field(rec, "cocoid", int, file=file, where=where, default=None)
    return str(cocoid) if cocoid is not None else os.path.splitext(filename)[0]

  def image_path(self, rec: dict, filename: str, manual_dir: str, *, file: str, where: str) -> str:
    folder = read.field(rec, "filepath", str, file=file, where=where, default="")
    return os.path.join(manual_dir, folder, filename)
