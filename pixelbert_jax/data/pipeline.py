"""The data pipeline's entry points: make_iterator for every task, split sizes, and evaluator look-ups.

Batches follow a global plan (data/plan.py): every process computes the same sequence of global batches of
G = batch_size * process_count records, all of one bucket, and takes rows [p*B, (p+1)*B). So the batch
of step t has the same shapes on every process, the concatenated global batch does not depend on the
process count, and per-example randomness is a function of (seed, stream position) only.
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np
from transformers import BertTokenizerFast

from pixelbert_jax.data import builders, vqa_answers
from pixelbert_jax.data.batches import BatchIterator, planned_iterator
from pixelbert_jax.data.examples import PretrainExamples, record_buckets
from pixelbert_jax.data.finetune_examples import Nlvr2Examples, RetrievalExamples, VqaExamples
from pixelbert_jax.data.retrieval_gallery import RetrievalGallery
from pixelbert_jax.data.sources import OpenSplit, open_split
from pixelbert_jax.data.split_index import sidecar_dir
from pixelbert_jax.data.text import tokenizer, vocab_path, vocab_size  # part of the pipeline's API

TASKS = ("pretrain", "vqa", "nlvr2", "retrieval")


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def num_examples(data_cfg: ml_collections.ConfigDict, split: str, task: str = "pretrain") -> int:
  """Records of `split` as `task` reads them: images (pretrain, retrieval), questions (vqa), statements (nlvr2)."""
  _check_task(task)
  return len(open_split(data_cfg, task, split).index)


def _train_split(data_cfg: ml_collections.ConfigDict) -> str:
  return data_cfg.get("train_split", "train") or "train"


def answer_vocab(data_cfg: ml_collections.ConfigDict) -> list[str]:
  """VQA answers given at least `vqa_min_answer_count` times in the train split, most frequent first.

  Built once and saved beside the split's index; later calls read that small JSON file.
  """
  split, min_count = _train_split(data_cfg), int(data_cfg.vqa_min_answer_count)
  b = builders.builder(data_cfg, builders.TASK_SCHEMA["vqa"])
  if split not in b.info.splits:
    raise ValueError(
        f"dataset {data_cfg.name!r} has no split {split!r} to build the answer vocabulary from; "
        f"it has {sorted(b.info.splits)}"
    )
  n = b.info.splits[split].num_examples
  path = os.path.join(sidecar_dir(data_cfg.data_dir, b), f"answer_vocab_{split}_min{min_count}.json")
  if os.path.isfile(path):
    vocab = vqa_answers.load_vocab_file(path, min_count=min_count, num_records=n)
    if vocab is not None:
      return vocab
  index = open_split(data_cfg, "vqa", split, texts=True).index
  vocab = vqa_answers.build_answer_vocab(index.answers, min_count)
  if not vocab:
    raise ValueError(
        f"{data_cfg.name}/{split}: no answer is given {min_count} times or more "
        "(lower config.data.vqa_min_answer_count)"
    )
  vqa_answers.save_vocab_file(path, vocab, min_count=min_count, num_records=n, split=split)
  # Your own data: how much of it the vocabulary can answer at all, to choose vqa_min_answer_count by.
  known = set(vocab)
  covered = sum(any(a in known for a in answers) for answers in index.answers)
  logging.info(
      "%s/%s: answer vocabulary of %d answers given >= %d times; %d of %d questions have an answer in it",
      data_cfg.name,
      split,
      len(vocab),
      min_count,
      covered,
      len(index.answers),
  )
  return vocab


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
  vp = vocab_path(data_cfg)
  if task == "pretrain":
    return PretrainExamples(opened, data_cfg, vp, seed=seed, train=train)
  if task == "vqa":
    return VqaExamples(opened, data_cfg, vp, seed=seed, train=train, answers=answer_vocab(data_cfg))
  if task == "nlvr2":
    return Nlvr2Examples(opened, data_cfg, vp, seed=seed, train=train)
  return RetrievalExamples(opened, data_cfg, vp, seed=seed, train=train, negatives=int(data_cfg.retrieval_negatives))


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
  _check_task(task)
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
