"""The grain pipeline: per-process shards, per-epoch shuffling, per-example randomness from (seed, position),
bucketed fixed-shape numpy batches, bad-record accounting and exactly resumable iterator state.

Every example is a pure function of its stream position, so the iterator state is just grain's position
plus the positions of the examples waiting in half-full buckets (recomputed on restore). That state is a
small JSON dict, and a restored iterator yields exactly the batches the original would have.
"""
from __future__ import annotations

import logging
import math
import os

import grain
from absl import flags
import ml_collections
import numpy as np
from transformers import BertTokenizerFast

from pixelbert_jax.data import builders, synthetic, text
from pixelbert_jax.data.examples import PAD_POSITION, PretrainExamples

_MIN_SEEN_FOR_BAD_CHECK = 200
_SHOW_BAD = 5


def vocab_path(data_cfg: ml_collections.ConfigDict) -> str:
  if data_cfg.vocab_path:
    return data_cfg.vocab_path
  if data_cfg.name != "synthetic":
    raise ValueError(f"dataset {data_cfg.name!r} needs a BERT vocab: set config.data.vocab_path")
  return text.write_world_vocab(os.path.join(data_cfg.data_dir, "synthetic_world_vocab"), synthetic.world_words())


def tokenizer(data_cfg: ml_collections.ConfigDict) -> BertTokenizerFast:
  return text.load_tokenizer(vocab_path(data_cfg))


def vocab_size(data_cfg: ml_collections.ConfigDict) -> int:
  return len(tokenizer(data_cfg))


def num_examples(data_cfg: ml_collections.ConfigDict, split: str, task: str = "pretrain") -> int:
  return len(builders.data_source(data_cfg, task, split))


class BatchIterator:
  """Iterator of batches (dict[str, np.ndarray]) with get_state() / set_state(state)."""

  def __init__(self, examples: grain.MapDataset, *, batch_size: int, train: bool, max_bad_fraction: float,
               num_workers: int, prefetch: int, pad_example):
    self._examples = examples
    self._batch_size = batch_size
    self._train = train
    self._max_bad_fraction = max_bad_fraction
    self._pad_example = pad_example
    ds = examples.to_iter_dataset()
    if num_workers > 0:
      if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside an absl app use defaults
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
    self._it = iter(ds)
    self._buffers: dict[tuple[int, int], list[dict]] = {}
    self._seen = self._bad = 0
    self._bad_messages: list[str] = []

  def __iter__(self):
    return self

  def _check_bad(self, final: bool) -> None:
    if self._bad and (final or self._seen >= _MIN_SEEN_FOR_BAD_CHECK) and \
        self._bad > self._max_bad_fraction * self._seen:
      raise RuntimeError(f"{self._bad} of {self._seen} records were bad (max_bad_fraction="
                         f"{self._max_bad_fraction}); first ones: " + "; ".join(self._bad_messages))

  def _emit(self, key, elements: list[dict]) -> dict[str, np.ndarray]:
    while len(elements) < self._batch_size:
      elements.append(self._pad_example(key))
    return {k: np.stack([e[k] for e in elements]) for k in elements[0] if not k.startswith("_")}

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      try:
        element = next(self._it)
      except StopIteration:
        self._check_bad(final=True)
        for key in sorted(self._buffers):
          if self._buffers[key]:
            return self._emit(key, self._buffers.pop(key))
        raise
      if element.get("_bad"):
        self._seen += 1
        self._bad += 1
        if len(self._bad_messages) < _SHOW_BAD:
          self._bad_messages.append(element["_bad"])
        logging.warning("skipping bad record (%d so far): %s", self._bad, element["_bad"])
        self._check_bad(final=False)
        if self._train:
          continue
        element = self._pad_example(None, position=element["_pos"])  # keeps eval batch counts fixed
      elif element["_pos"] >= 0 and element["example_mask"] > 0:
        self._seen += 1
      key = element["image"].shape[:2]
      bucket = self._buffers.setdefault(key, [])
      bucket.append(element)
      if len(bucket) == self._batch_size:
        return self._emit(key, self._buffers.pop(key))

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), "seen": self._seen, "bad": self._bad,
            "bad_messages": list(self._bad_messages),
            "buffers": [[int(e["_pos"]) for e in b] for _, b in sorted(self._buffers.items())]}

  def set_state(self, state: dict) -> None:
    self._it.set_state(state["grain"])
    self._seen, self._bad = int(state["seen"]), int(state["bad"])
    self._bad_messages = list(state["bad_messages"])
    self._buffers = {}
    for positions in state["buffers"]:
      for pos in positions:
        element = self._examples[pos]
        if element.get("_bad"):
          element = self._pad_example(None, position=pos)
        self._buffers.setdefault(element["image"].shape[:2], []).append(element)


def make_iterator(data_cfg: ml_collections.ConfigDict, task: str, split: str, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, train: bool = True) -> BatchIterator:
  """Batches of `split` for `task` from this process's shard (records process_index::process_count).

  train=True: infinite, reshuffled every epoch from (seed, epoch), random MLM/ITM from (seed, position).
  train=False: one pass in record order with fixed masking; every process yields the same number of
  examples (shorter shards get a padding example) and the last batch is padded with example_mask=0.
  """
  if task != "pretrain":
    raise NotImplementedError(f"make_iterator for task {task!r} is not implemented yet (only 'pretrain')")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  source = builders.data_source(data_cfg, task, split)
  n = len(source)
  shard = list(range(process_index, n, process_count))
  if not train:
    shard += [PAD_POSITION] * (math.ceil(n / process_count) - len(shard))
  if not shard:
    raise ValueError(f"split {split!r} of {data_cfg.name!r} has {n} records: nothing for process {process_index}")
  examples = PretrainExamples(source, shard, data_cfg, vocab_path(data_cfg), seed=seed, train=train,
                              name=f"{data_cfg.name}/{split}")
  ds = grain.MapDataset.range(len(shard))
  if train:
    ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.map_with_index(examples)
  return BatchIterator(ds, batch_size=batch_size, train=train, max_bad_fraction=data_cfg.max_bad_fraction,
                       num_workers=data_cfg.num_workers, prefetch=data_cfg.prefetch, pad_example=examples.padding)
