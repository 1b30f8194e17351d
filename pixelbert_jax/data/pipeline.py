"""The data pipeline's entry points: make_iterator for every task, split sizes, and evaluator look-ups.

Batches follow a global plan (data/plan.py): every process computes the same sequence of global batches of
G = batch_size * process_count records, all of one bucket, and takes rows [p*B, (p+1)*B). So the batch
of step t has the same shapes on every process, the concatenated global batch does not depend on the
process count, and per-example randomness is a function of (seed, stream position) only.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from pixelbert_jax import task_table
from pixelbert_jax.data.batches import BatchIterator, planned_iterator
from pixelbert_jax.data.examples import record_buckets
from pixelbert_jax.data.retrieval_gallery import RetrievalGallery
from pixelbert_jax.data.sources import OpenSplit, open_split

# Part of the pipeline's API, defined beside what they need.
from pixelbert_jax.data.text import tokenizer, vocab_path, vocab_size  # noqa: F401
from pixelbert_jax.data.vqa_answers import answer_vocab  # noqa: F401


def resolve_from_data(config: ml_collections.ConfigDict) -> None:
  """Replaces the config's -1 sizes by the data's, in place: `model.vocab_size` (the tokenizer's) and, for
  VQA, `model.num_answers` (the answer vocabulary of the train split). Configs leave them -1 so that loading
  one does no I/O and `--config.data.*` overrides apply before the data is opened."""
  if int(config.model.vocab_size) == -1:
    config.model.vocab_size = vocab_size(config.data)
  if config.task == "vqa" and int(config.model.num_answers) == -1:
    config.model.num_answers = len(answer_vocab(config.data))


def num_examples(data_cfg: ml_collections.ConfigDict, split: str, task: str = "pretrain") -> int:
  """Records of `split` as `task` reads them: images (pretrain, retrieval), questions (vqa), statements (nlvr2)."""
  task_table.spec(task)
  return len(open_split(data_cfg, task, split).index)


def vqa_ground_truth(data_cfg: ml_collections.ConfigDict, split: str) -> dict[int, dict]:
  """{question_id: {"answers": [raw annotator answers], "question_type": str, "answer_type": str}}."""
  index = open_split(data_cfg, "vqa", split, texts=True).index
  return {
      int(q): {"answers": list(a), "question_type": qt, "answer_type": at}
      for q, a, qt, at in zip(index.question_ids, index.answers, index.question_types, index.answer_types)
  }


def nlvr2_identifiers(data_cfg: ml_collections.ConfigDict, split: str) -> list[str]:
  """Identifier of each record of the split; batches carry the position in this list as `example_index`."""
  return list(open_split(data_cfg, "nlvr2", split).index.ids)


def make_examples(data_cfg: ml_collections.ConfigDict, task: str, opened: OpenSplit, *, seed: int, train: bool):
  """The task's record -> example function (its `examples` class in task_table.py)."""
  examples_class = task_table.resolve(task_table.spec(task).examples)
  return examples_class(opened, data_cfg, vocab_path(data_cfg), seed=seed, train=train)


def make_iterator(
    data_cfg: ml_collections.ConfigDict,
    task: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    train: bool = True,
) -> BatchIterator:
  """This process's batches (batch_size rows each) of `split` for `task`; keys per docs/contracts.md.

  train=True: infinite; every epoch a global permutation from (seed, epoch); randomness from
  (seed, stream position). train=False: one pass in record order with fixed randomness; every process
  yields the same number of batches with the same shapes; padding rows have example_mask=0.
  `num_batches` of the iterator is that count (None for train).
  """
  opened = open_split(data_cfg, task, split, texts=task == "retrieval")
  examples = make_examples(data_cfg, task, opened, seed=seed, train=train)
  return planned_iterator(
      data_cfg,
      opened,
      examples,
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      train=train,
  )


def retrieval_gallery(data_cfg: ml_collections.ConfigDict, split: str) -> RetrievalGallery:
  """Every image of `split` (batched with its index) and every caption with its image's index."""
  return RetrievalGallery(data_cfg, split)


def plan_summary(data_cfg: ml_collections.ConfigDict, task: str, split: str) -> dict[str, int]:
  """Records per bucket (as 'HxW'), to size batches against the buckets a dataset really fills."""
  opened = open_split(data_cfg, task, split)
  counts = np.bincount(record_buckets(opened.index.sizes, data_cfg), minlength=len(data_cfg.buckets))
  return {f"{h}x{w}": int(c) for (h, w), c in zip(data_cfg.buckets, counts)}
