"""A retrieval split as a gallery to rank: every image once (for a cached CNN pass) and every caption with its image.

A cross-encoder scores every (image, caption) pair, so the evaluator needs the images and the captions
separately, not batches of pairs: images come in planned eval batches (one bucket per batch, the same
number of batches on every process, padding rows with example_mask=0 and image_index=-1), captions as one
tokenised array with `caption_image_index` (the index of each caption's image in the split).
"""

from __future__ import annotations

from typing import Iterator

import ml_collections
import numpy as np

from pixelbert_jax.data import text
from pixelbert_jax.data.batches import planned_iterator
from pixelbert_jax.data.examples import Examples
from pixelbert_jax.data.sources import OpenSplit, open_split


class ImageExamples(Examples):
  """image, image_mask, `image_index` (record index in the split), example_mask."""

  def _padding_extra(self, h, w):
    return {"image_index": np.int64(-1)}

  def padding(self, bucket_id, position=-1):
    out = super().padding(bucket_id, position)
    del out["input_ids"], out["text_mask"]
    return out

  def _example(self, index, record, position, bucket):
    image, image_mask = self.image(self._field(record, "image", index), bucket, self.record_name(index))
    return {"image": image, "image_mask": image_mask, "image_index": np.int64(index), "example_mask": np.float32(1)}


class RetrievalGallery:
  """Attributes: `num_images`, `image_ids` (list[str]), `captions` (list[str]), `caption_image_index`
  (int64 [C]), `input_ids` / `text_mask` (int32 [C, L]); `image_batches(...)` yields the images."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, split: str, opened: OpenSplit | None = None):
    """`opened`: the split opened already (data/task_data.py); by default it is opened here."""
    self._cfg, self._split = data_cfg, split
    self._opened = opened if opened is not None else open_split(data_cfg, "retrieval", split, texts=True)
    index = self._opened.with_texts()
    self.image_ids = list(index.ids)
    self.num_images = len(self.image_ids)
    self.captions, owners = [], []
    for i, caps in enumerate(index.captions):
      for c in caps:
        if c.strip():
          self.captions.append(c.strip())
          owners.append(i)
    self.caption_image_index = np.asarray(owners, np.int64)
    tok = text.tokenizer(data_cfg)
    L = int(data_cfg.max_text_len)
    enc = tok(self.captions, max_length=L, truncation=True, padding="max_length")
    self.input_ids = np.asarray(enc["input_ids"], np.int32).reshape(-1, L)
    self.text_mask = np.asarray(enc["attention_mask"], np.int32).reshape(-1, L)

  _KEYS = ("image", "image_mask", "image_id", "caption_image", "input_ids", "text_mask")

  def __getitem__(self, key: str):
    """Mapping view for evaluators that hold the whole split in memory: 'image' / 'image_mask' (lists in
    image order, decoded on first access; a bad image is all zeros with an all-False mask), 'image_id',
    'caption_image' (= caption_image_index), 'input_ids', 'text_mask'. At paper sizes a 5K-image split
    is about 16 GB of images: stream `image_batches` instead there."""
    if key not in self._KEYS:
      raise KeyError(f"a retrieval gallery has keys {self._KEYS}, not {key!r}")
    if key in ("image", "image_mask"):
      return self._all_images()[0 if key == "image" else 1]
    return {
        "image_id": self.image_ids,
        "caption_image": self.caption_image_index,
        "input_ids": self.input_ids,
        "text_mask": self.text_mask,
    }[key]

  def get(self, key: str, default=None):
    return self[key] if key in self._KEYS else default

  def keys(self):
    return list(self._KEYS)

  def _all_images(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if getattr(self, "_images", None) is None:
      images, masks = [None] * self.num_images, [None] * self.num_images
      shape = None
      for batch in self.image_batches(8):
        for img, mask, i, m in zip(batch["image"], batch["image_mask"], batch["image_index"], batch["example_mask"]):
          shape = shape or img.shape
          if m:
            images[int(i)], masks[int(i)] = img, mask
      for i in range(self.num_images):
        if images[i] is None:  # a bad image: nothing to match, and nothing attended to
          images[i], masks[i] = np.zeros(shape, np.uint8), np.zeros(shape[:2], bool)
      self._images = (images, masks)
    return self._images

  def image_batches(
      self, batch_size: int, *, process_index: int = 0, process_count: int = 1, seed: int = 0
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's image batches (batch_size rows): image, image_mask, image_index, example_mask."""
    examples = ImageExamples(self._opened, self._cfg, text.vocab_path(self._cfg), seed=seed, train=False)
    return planned_iterator(
        self._cfg,
        self._opened,
        examples,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        train=False,
    )
