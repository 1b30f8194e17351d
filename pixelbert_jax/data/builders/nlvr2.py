"""NLVR2 from its JSON-lines files and image folders; image files are sniffed, not trusted by extension.

Some NLVR2 "png" files are JPEGs (or other formats) under a .png name: PIL identifies the format from the
bytes, and the stored bytes are the file as it is, so the pipeline's decoder sniffs them the same way.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import tensorflow_datasets as tfds

from pixelbert_jax.data.builders import _common as c
from pixelbert_jax.data.builders import _read as read
from pixelbert_jax.data.preprocess import BadImageError
from pixelbert_jax.data.schemas import SCHEMAS

SPLITS = ("train", "dev", "test1", "test2")  # test2: released with labels after the paper
_LABELS = {"True": 1, "true": 1, "False": 0, "false": 0, True: 1, False: 0}


class Nlvr2(c.ManualBuilder):
  """NLVR2 statements about image pairs: label 1 = True, 0 = False; splits train, dev, test1, test2 as given.

  Each image file is stored once, however many statements name it (layout.py).
  """

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Original encoded image pairs (format sniffed), sentence, label.",
      "2.0.0": "Layout 2: each image stored once (split 'images'), statements point at both; test2 read.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into manual_dir (any of the splits; train is the usual minimum):
    train.json, dev.json, test1.json, test2.json   JSON lines: {"identifier": "split-set-pair-sentence",
                                          "sentence", "label": "True"|"False", "left_url", "right_url", ...}
    images/train/**/train-<set>-<pair>-img0.png and -img1.png   (nested numbered folders are fine)
    images/dev/..., images/test1/..., images/test2/...   (or directly in manual_dir: train/, dev/, ...)
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(SCHEMAS["nlvr2"].features(), homepage="https://lil.nlp.cornell.edu/nlvr/")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual_dir = self.manual_path(dl_manager)
    table = self.start_table(manual_dir)
    splits = {}
    for split in SPLITS:
      json_path = os.path.join(manual_dir, f"{split}.json")
      if not os.path.isfile(json_path):
        continue
      image_root = read.first_existing_dir(
          [os.path.join(manual_dir, "images", split), os.path.join(manual_dir, split)],
          what=f"NLVR2 {split} image",
          hint=self.MANUAL_DOWNLOAD_INSTRUCTIONS,
      )
      statements, images = read_statements(json_path), index_images(image_root)
      for st in statements:
        for k in (0, 1):
          if f"{st['pair']}-img{k}" in images:
            table.add(images[f"{st['pair']}-img{k}"])
      splits[split] = self._generate_examples(split, statements, images)
    if not splits:
      raise FileNotFoundError(
          f"none of {[s + '.json' for s in SPLITS]} found in {manual_dir}. " f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    return self.with_table(splits)

  def _generate_examples(
      self, split: str, statements: list[dict], images: dict[str, str]
  ) -> Iterator[tuple[int, dict]]:
    def make(st: dict, tally: c.BadRecordTally) -> dict | None:
      if not st["sentence"]:
        tally.skip(st["identifier"], "empty sentence")
        return None
      example = {"identifier": st["identifier"], "sentence": st["sentence"], "label": st["label"]}
      for k in (0, 1):
        name = f"{st['pair']}-img{k}"
        if name not in images:
          raise BadImageError(f"{name}.png: missing (no file with this name under the {split} images)")
        row, height, width = self.table.row(images[name])
        example.update({f"image{k}_index": row, f"height{k}": height, f"width{k}": width})
      return example

    return self.records(split, [(st["identifier"], st) for st in statements], make)


def read_statements(path: str) -> list[dict]:
  statements, seen = [], set()
  for line_no, rec in read.iter_json_lines(path):
    where = f"line {line_no}"
    identifier = read.field(rec, "identifier", str, file=path, where=where)
    where = f"line {line_no} ({identifier})"
    read.check_unique(seen, identifier, file=path, where=where, what="identifier")
    parts = identifier.split("-")
    if len(parts) != 4:
      raise read.RecordError(
          f"{path}: record {where}: key 'identifier' must look like " f"split-set-pair-sentence, got {identifier!r}"
      )
    sentence = read.field(rec, "sentence", str, file=path, where=where)
    label = read.field(rec, "label", (str, bool), file=path, where=where)
    if label not in _LABELS:
      raise read.RecordError(f"{path}: record {where}: key 'label' must be 'True' or 'False', got {label!r}")
    statements.append(
        {"identifier": identifier, "sentence": sentence.strip(), "label": _LABELS[label], "pair": "-".join(parts[:3])}
    )
  return statements


def index_images(root: str) -> dict[str, str]:
  """File name without extension -> path, for every file under root (train nests them in 0..99/)."""
  index = {}
  for folder, _, files in os.walk(root):
    for name in files:
      index.setdefault(os.path.splitext(name)[0], os.path.join(folder, name))
  return index
