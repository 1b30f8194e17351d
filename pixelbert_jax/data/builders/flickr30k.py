"""Flickr30K with Karpathy's split, from the user's dataset_flickr30k.json and the flickr30k-images folder."""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from pixelbert_jax.data.builders import _read as read
from pixelbert_jax.data.builders._karpathy import KarpathyBuilder

# Kaggle's copy unpacks to flickr30k_images/flickr30k_images/ (beside results.csv): the nested folder is
# looked for before its parent, which holds no image.
IMAGE_FOLDERS = ("flickr30k-images", "flickr30k_images/flickr30k_images", "flickr30k_images", "images")


class Flickr30kKarpathy(KarpathyBuilder):
  """Flickr30K, Karpathy split: train (29000 images), val (1014), test (1000); image_id = file stem."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Original encoded images, raw captions, Karpathy split.",
      "2.0.0": "Layout 2: each image stored once (split 'images'), records point at it.",
  }
  HOMEPAGE = "https://shannon.cs.illinois.edu/DenotationGraph/"
  JSON_NAME = "dataset_flickr30k.json"
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put into manual_dir:
    dataset_flickr30k.json   (from Karpathy's caption_datasets.zip)
    flickr30k-images/*.jpg   (or the first of {IMAGE_FOLDERS} that exists)
  """

  def prepare_layout(self, manual_dir: str) -> None:
    self._image_dir = read.first_existing_dir(
        (os.path.join(manual_dir, d) for d in IMAGE_FOLDERS),
        what="Flickr30K image",
        hint=self.MANUAL_DOWNLOAD_INSTRUCTIONS,
    )

  def image_path(self, rec: dict, filename: str, manual_dir: str, *, file: str, where: str) -> str:
    return os.path.join(self._image_dir, filename)
