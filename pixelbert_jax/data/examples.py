"""One training example from one record: a pure function of (seed, stream position), run in grain workers.

Bad data (an image decode_image refuses, a record without a usable caption) becomes a `_bad` element that
names the record, so the main process can count and skip it; any other exception is re-raised naming the
record, so nothing dies inside a worker anonymously.
"""
from __future__ import annotations

from typing import Sequence

import ml_collections
import numpy as np

from pixelbert_jax.data import text
from pixelbert_jax.data.preprocess import BadImageError, decode_image, resize_and_pad, validate_buckets

PAD_POSITION = -1  # a shard entry that is only padding (eval shards are padded to equal length)


class BadRecordError(ValueError):
  """A record that cannot be used (e.g. no non-empty caption); the message names the record."""


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class PretrainExamples:
  """Callable (stream position, shard entry) -> example dict with the contract's pre-training keys."""

  def __init__(self, source, shard: Sequence[int], data_cfg: ml_collections.ConfigDict, vocab_path: str, *,
               seed: int, train: bool, name: str):
    self._source = source
    self._shard = list(shard)
    self._vocab_path = vocab_path
    self._seed = seed
    self._train = train
    self._name = name
    self._max_len = int(data_cfg.max_text_len)
    self._mlm_prob = float(data_cfg.mlm_prob)
    self._itm_neg_prob = float(data_cfg.itm_neg_prob)
    self._short, self._long = int(data_cfg.image_short_side), int(data_cfg.image_long_side)
    self._buckets = validate_buckets(data_cfg.buckets)
    self._max_pixels = int(data_cfg.max_image_pixels)

  def _record_name(self, index: int, record=None) -> str:
    image_id = _str(record.get("image_id", "?")) if isinstance(record, dict) else "?"
    return f"{self._name}[{index}] (image_id {image_id})"

  def padding(self, key, position: int = PAD_POSITION) -> dict:
    h, w = key if key is not None else self._buckets[0]
    L = self._max_len
    return {"image": np.zeros((h, w, 3), np.uint8), "image_mask": np.zeros((h, w), bool),
            "input_ids": np.zeros(L, np.int32), "text_mask": np.zeros(L, np.int32),
            "example_mask": np.float32(0), "mlm_labels": np.zeros(L, np.int32),
            "mlm_weights": np.zeros(L, np.float32), "mlm_grounded": np.zeros(L, np.float32),
            "itm_label": np.int32(0), "_pos": position}

  def _captions(self, record, index: int) -> list[tuple[str, np.ndarray]]:
    """Non-empty (caption, grounded word indices) pairs of a record."""
    if "captions" not in record:
      raise BadRecordError(f"{self._record_name(index, record)}: no 'captions' key (keys: {sorted(record)})")
    grounded = record.get("grounded_words")
    out = []
    for k, c in enumerate(record["captions"]):
      caption = _str(c).strip()
      if caption:
        g = np.asarray(grounded[k]) if grounded is not None and k < len(grounded) else np.zeros(0, np.int32)
        out.append((caption, g[g >= 0]))
    return out

  def _image_id(self, index: int) -> str:
    return _str(self._source[index].get("image_id", f"#{index}"))

  def __call__(self, position: int, entry: int) -> dict:
    index = self._shard[entry]
    if index == PAD_POSITION:
      return self.padding(None, position)
    record = None
    try:
      record = self._source[index]
      return self._example(position, index, record)
    except (BadImageError, BadRecordError) as e:
      return {"_bad": f"{self._record_name(index, record)}: {e}", "_pos": position}
    except Exception as e:
      raise RuntimeError(f"failed on record {self._record_name(index, record)}: {type(e).__name__}: {e}") from e

  def _example(self, position: int, index: int, record) -> dict:
    name = self._record_name(index, record)
    if "image" not in record:
      raise BadRecordError(f"{name}: no 'image' key (keys: {sorted(record)})")
    image = decode_image(record["image"], name=name, max_pixels=self._max_pixels)
    image, image_mask = resize_and_pad(image, short_side=self._short, long_side=self._long, buckets=self._buckets)
    captions = self._captions(record, index)
    if not captions:
      raise BadRecordError(f"{name}: no non-empty caption")
    # train: fresh randomness at every stream position (so every epoch differs); eval: fixed per record
    rng = np.random.default_rng([self._seed, position] if self._train else [self._seed, 1 << 30, index])
    caption, grounded_words = captions[int(rng.integers(len(captions)))]
    matched = rng.uniform() >= self._itm_neg_prob
    if not matched:
      own_id = _str(record.get("image_id", f"#{index}"))
      j = text.sample_other(rng, len(self._source), index,
                            lambda j: self._image_id(j) == own_id or not self._captions(self._source[j], j))
      negatives = self._captions(self._source[j], j)
      caption, grounded_words = negatives[int(rng.integers(len(negatives)))]
    tok = text.load_tokenizer(self._vocab_path)
    ids, text_mask, grounded = text.encode(tok, caption, self._max_len, grounded_words)
    if matched:
      masked, labels, weights = text.mlm_mask(ids, text_mask, rng, prob=self._mlm_prob, mask_id=tok.mask_token_id,
                                              special_ids=tok.all_special_ids, vocab_size=len(tok))
    else:
      masked, labels, weights = ids, np.zeros_like(ids), np.zeros(ids.shape, np.float32)
    return {"image": image, "image_mask": image_mask, "input_ids": masked.astype(np.int32),
            "text_mask": text_mask, "example_mask": np.float32(1), "mlm_labels": labels.astype(np.int32),
            "mlm_weights": weights, "mlm_grounded": grounded, "itm_label": np.int32(matched), "_pos": position}
