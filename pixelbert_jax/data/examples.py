"""One example from one record, a pure function of (record, stream position, planned bucket), run in workers.

`Examples` holds what every task shares: the planned bucket, image decoding into it, tokenisation, the
per-example random generator, padding rows and bad-record handling. Bad data (an image decode_image refuses,
a record without a usable text) becomes a `_bad` element that names the record, so the main process can
count it and put a padding row (example_mask=0) in its place; any other exception is re-raised naming the
record, so nothing dies inside a worker anonymously. Task subclasses add their keys.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from pixelbert_jax.data import synthetic as world
from pixelbert_jax.data import text
from pixelbert_jax.data.plan import PAD_RECORD
from pixelbert_jax.data.preprocess import (
    BadImageError,
    choose_bucket,
    decode_image,
    resize_and_pad,
    resized_shape,
    validate_buckets,
)

_EVAL_STREAM = 1 << 30  # eval randomness is seeded per record, apart from any train position


class BadRecordError(ValueError):
  """A record that cannot be used (e.g. no non-empty caption); the message names the record."""


def as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_buckets(sizes: np.ndarray, data_cfg: ml_collections.ConfigDict) -> np.ndarray:
  """Bucket id (index into data_cfg.buckets) of every record from its stored (h, w) or (h0, w0, h1, w1).

  An image pair shares one bucket: the one that holds both resized images (the task can then stack both
  images into one pass); it is the image's own bucket whenever both images would choose the same one.
  """
  buckets = validate_buckets(data_cfg.buckets)
  short, long = int(data_cfg.image_short_side), int(data_cfg.image_long_side)
  ids = {b: k for k, b in enumerate(buckets)}
  cache: dict[tuple[int, ...], int] = {}
  out = np.zeros(len(sizes), np.int64)
  for i, row in enumerate(np.asarray(sizes)):
    key = tuple(int(v) for v in row)
    if key not in cache:
      shapes = [resized_shape(key[k], key[k + 1], short_side=short, long_side=long) for k in range(0, len(key), 2)]
      h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
      cache[key] = ids[choose_bucket(h, w, buckets)]
    out[i] = cache[key]
  return out


class Examples:
  """Callable (record index, stream position, bucket id) -> example dict; subclasses define `_example`."""

  def __init__(self, opened, data_cfg: ml_collections.ConfigDict, vocab_path: str, *, seed: int, train: bool):
    self._source, self._index, self._name = opened.source, opened.index, opened.name
    # the same records without image bytes, for reads that need only a record's text (ITM negatives)
    self._records = getattr(opened.source, "records", opened.source)
    self._vocab_path = vocab_path
    self._seed, self._train = int(seed), train
    self._max_len = int(data_cfg.max_text_len)
    self._short, self._long = int(data_cfg.image_short_side), int(data_cfg.image_long_side)
    self._buckets = validate_buckets(data_cfg.buckets)
    self._max_pixels = int(data_cfg.max_image_pixels)
    # a frozen CNN's cached features (feature_cache.py), read in place of the image where a task supports it
    self.features = None

  @classmethod
  def from_data(cls, data, opened, *, seed: int, train: bool) -> "Examples":
    """The examples of `opened`, a split of `data` (data/task_data.py's TaskData), with what they need from
    it (the vocabulary file; VQA: the answer vocabulary, built once per run)."""
    return cls(opened, data.config, data.vocab_path, seed=seed, train=train)

  @property
  def tokenizer(self):
    return text.load_tokenizer(self._vocab_path)

  def record_name(self, index: int) -> str:
    return f"{self._name}[{index}] (id {self._index.ids[index]})"

  def rng(self, position: int, index: int) -> np.random.Generator:
    # train: fresh randomness at every stream position (every epoch differs); eval: fixed per record
    return np.random.default_rng([self._seed, position] if self._train else [self._seed, _EVAL_STREAM, index])

  def image(self, data, bucket: tuple[int, int], name: str) -> tuple[np.ndarray, np.ndarray]:
    image = decode_image(data, name=name, max_pixels=self._max_pixels)
    return resize_and_pad(image, short_side=self._short, long_side=self._long, buckets=self._buckets, bucket=bucket)

  def encode(self, sentence: str, grounded_words=()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return text.encode(self.tokenizer, sentence, self._max_len, grounded_words)

  def pixels(self, record, index: int, bucket: tuple[int, int], name: str) -> dict[str, np.ndarray]:
    """image and image_mask; with a feature cache, the image's cached c5 and pixel_mask instead."""
    if self.features is not None:
      return self.features.example(int(self._field(record, "image_index", index)))
    image, image_mask = self.image(self._field(record, "image", index), bucket, name)
    return {"image": image, "image_mask": image_mask}

  def padding(self, bucket_id: int, position: int = PAD_RECORD) -> dict:
    h, w = self._buckets[bucket_id]
    L = self._max_len
    if self.features is not None:
      pixels = {k: np.zeros_like(v) for k, v in self.features.example(0).items()}
    else:
      pixels = {"image": np.zeros((h, w, 3), np.uint8), "image_mask": np.zeros((h, w), bool)}
    return {
        **pixels,
        "input_ids": np.zeros(L, np.int32),
        "text_mask": np.zeros(L, np.int32),
        "example_mask": np.float32(0),
        **self._padding_extra(h, w),
        "_pos": position,
    }

  def _padding_extra(self, h: int, w: int) -> dict:
    return {}

  def __call__(self, index: int, position: int, bucket_id: int) -> dict:
    index = int(index)
    if index == PAD_RECORD:
      return self.padding(bucket_id, position)
    try:
      # with cached features no image is read: the records alone (their `image_index` rows)
      record = (self._records if self.features is not None else self._source)[index]
      out = self._example(index, record, int(position), self._buckets[bucket_id])
      out["_pos"] = int(position)
      return out
    except (BadImageError, BadRecordError) as e:
      return {"_bad": f"{self.record_name(index)}: {e}", "_pos": int(position)}
    except Exception as e:
      raise RuntimeError(f"failed on record {self.record_name(index)}: {type(e).__name__}: {e}") from e

  def _example(self, index: int, record, position: int, bucket: tuple[int, int]) -> dict:
    raise NotImplementedError

  def _field(self, record, key: str, index: int):
    if key not in record:
      raise BadRecordError(f"{self.record_name(index)}: no {key!r} key (keys: {sorted(record)})")
    return record[key]


def nonempty_captions(record, grounded=None) -> list[tuple[str, np.ndarray]]:
  """Non-empty (caption, grounded word indices) pairs of a captions record."""
  out = []
  for k, c in enumerate(record["captions"]):
    caption = as_str(c).strip()
    if caption:
      g = np.asarray(grounded[k]) if grounded is not None and k < len(grounded) else np.zeros(0, np.int32)
      out.append((caption, g[g >= 0]))
  return out


class PretrainExamples(Examples):
  """MLM + ITM pairs: the contract's pre-training keys."""

  def __init__(self, opened, data_cfg, vocab_path, *, seed, train):
    super().__init__(opened, data_cfg, vocab_path, seed=seed, train=train)
    self._mlm_prob = float(data_cfg.mlm_prob)
    self._itm_neg_prob = float(data_cfg.itm_neg_prob)
    # The synthetic world's evaluation also gets the token ids of the image's colour and shape words: which
    # value another object of the image would give a masked word (the binding metric, tasks/pretrain_eval.py)
    scenes = data_cfg.get("synthetic", {})
    self._scene_words = not train and bool(data_cfg.get("grounded_metric", False)) and scenes.get("max_objects", 1) > 1

  def _padding_extra(self, h, w):
    L = self._max_len
    extra = {
        "mlm_labels": np.zeros(L, np.int32),
        "mlm_weights": np.zeros(L, np.float32),
        "mlm_grounded": np.zeros(L, np.float32),
        "itm_label": np.int32(0),
    }
    if self._scene_words:
      extra.update(
          image_colours=np.full(world.MAX_OBJECTS, -1, np.int32), image_shapes=np.full(world.MAX_OBJECTS, -1, np.int32)
      )
    return extra if self._train else {**extra, "text_ids": np.zeros(L, np.int32)}

  def _scene_word_ids(self, record) -> dict[str, np.ndarray]:
    """image_colours / image_shapes: int32 [MAX_OBJECTS], the token ids of the scene's words, -1 padded (all -1
    for a record without `cell_labels`: the binding metric then counts none of its words)."""
    out = {}
    labels = record.get("cell_labels", np.full((1, 2), -1))
    for key, words in zip(("image_colours", "image_shapes"), world.scene_words(labels)):
      ids = np.full(world.MAX_OBJECTS, -1, np.int32)
      ids[: len(words)] = self.tokenizer.convert_tokens_to_ids(words)
      out[key] = ids
    return out

  def _captions(self, record, index: int) -> list[tuple[str, np.ndarray]]:
    self._field(record, "captions", index)
    return nonempty_captions(record, record.get("grounded_words"))

  def _example(self, index, record, position, bucket):
    name = self.record_name(index)
    pixels = self.pixels(record, index, bucket, name)
    captions = self._captions(record, index)
    if not captions:
      raise BadRecordError(f"{name}: no non-empty caption")
    rng = self.rng(position, index)
    caption, grounded_words = captions[int(rng.integers(len(captions)))]
    matched = rng.uniform() >= self._itm_neg_prob
    if not matched:
      ids, own = self._index.ids, self._index.ids[index]
      j = text.sample_other(
          rng, len(self._source), index, lambda j: ids[j] == own or not self._captions(self._records[j], j)
      )
      negatives = self._captions(self._records[j], j)
      caption, grounded_words = negatives[int(rng.integers(len(negatives)))]
    tok = self.tokenizer
    ids_, text_mask, grounded = self.encode(caption, grounded_words)
    # Every caption is masked the same way; only matched pairs carry MLM weight. Masking matched captions
    # alone would leak the ITM label into the text ("has [MASK] tokens" = matched): ITM then reaches ~0.95
    # without looking at the image, and nothing ever pushes the text to attend to the pixels.
    masked, labels, weights = text.mlm_mask(
        ids_,
        text_mask,
        rng,
        prob=self._mlm_prob,
        mask_id=tok.mask_token_id,
        special_ids=tok.all_special_ids,
        vocab_size=len(tok),
    )
    if not matched:
      labels, weights = np.zeros_like(labels), np.zeros_like(weights)
    out = {
        **pixels,
        "input_ids": masked.astype(np.int32),
        "text_mask": text_mask,
        "example_mask": np.float32(1),
        "mlm_labels": labels.astype(np.int32),
        "mlm_weights": weights,
        "mlm_grounded": grounded,
        "itm_label": np.int32(matched),
    }
    if self._scene_words:
      out.update(self._scene_word_ids(record))
    # evaluation also scores ITM on the caption as written (tasks/pretrain.py)
    return out if self._train else {**out, "text_ids": ids_.astype(np.int32)}
