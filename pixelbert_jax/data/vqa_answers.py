"""VQA answer vocabulary and soft scores.

Training targets follow what the evaluation scores (tasks/vqa_eval.py): a question with the official 10
human answers gets the published mapping 0, 0.3, 0.6, 0.9, 1 for 0, 1, 2, 3, >=4 matching annotators (the
official leave-one-out accuracy, approximately); a question with another number n of answers (your own
data) gets our evaluation rule, min(1, count / min(3, n)): 1 for the single answer of a one-answer question.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Callable, Iterable, Sequence

import ml_collections
import numpy as np

from pixelbert_jax import task_table
from pixelbert_jax.data import builders
from pixelbert_jax.data.sources import open_split
from pixelbert_jax.data.split_index import SplitIndex, sidecar_dir


def soft_score(count: int) -> float:
  """The published mapping: min(1, 0.3 * count), rounded so 3 annotators give 0.9 exactly."""
  return round(min(1.0, 0.3 * count), 6)


OFFICIAL_NUM_ANSWERS = 10  # VQA v1/v2 collect 10 human answers per question; the official metric needs them


def custom_score(matches: int, num_answers: int) -> float:
  """Our score of an answer given by `matches` of a question's `num_answers` (!= 10) humans:
  min(1, matches / min(3, num_answers)), so one answer of one is 1 and three agreeing answers are 1."""
  if num_answers < 1:
    raise ValueError(f"a question needs at least one human answer, got {num_answers}")
  return min(1.0, matches / min(3, num_answers))


def build_answer_vocab(answer_lists: Iterable[Sequence[str]], min_count: int) -> list[str]:
  """Answers given at least `min_count` times over all annotations, most frequent first (ties by name).

  Counting every annotator's answer is the convention that gives 3129 answers at min_count=9 on VQA v2
  train+val.
  """
  counts = collections.Counter(a for answers in answer_lists for a in answers)
  kept = [a for a, c in counts.items() if c >= min_count and a]
  return sorted(kept, key=lambda a: (-counts[a], a))


def soft_targets(answers: Sequence[str], vocab_index: dict[str, int]) -> np.ndarray:
  """float32 [num_answers]: the soft score of each vocabulary answer (`soft_score` when there are the official
  10 human answers, `custom_score` otherwise); answers outside the vocab are dropped."""
  target = np.zeros(len(vocab_index), np.float32)
  n = len(answers)
  for answer, count in collections.Counter(answers).items():
    if answer in vocab_index:
      target[vocab_index[answer]] = soft_score(count) if n == OFFICIAL_NUM_ANSWERS else custom_score(count, n)
  return target


def save_answer_vocab(path: str, vocab: Sequence[str]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(list(vocab), f)


def load_answer_vocab(path: str) -> list[str]:
  with open(path) as f:
    vocab = json.load(f)
  if not isinstance(vocab, list) or not all(isinstance(a, str) for a in vocab) or len(set(vocab)) != len(vocab):
    raise ValueError(f"{path}: answer vocab must be a JSON list of distinct strings")
  return vocab


_VOCAB_FORMAT = 1


def save_vocab_file(path: str, vocab: Sequence[str], *, min_count: int, num_records: int, split: str) -> None:
  """The vocabulary with what it was built from, so a stale file (data rebuilt, other min_count) is noticed."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(
        {
            "format": _VOCAB_FORMAT,
            "split": split,
            "min_count": int(min_count),
            "num_records": int(num_records),
            "answers": list(vocab),
        },
        f,
    )
  os.replace(tmp, path)


def load_vocab_file(path: str, *, min_count: int, num_records: int) -> list[str] | None:
  """The answers of a file written by save_vocab_file; None when it was built from other data."""
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: answer vocabulary is not valid JSON ({e}); delete it to rebuild") from e
  if not isinstance(data, dict) or data.get("format") != _VOCAB_FORMAT:
    raise ValueError(f"{path}: not an answer vocabulary file of format {_VOCAB_FORMAT}; delete it to rebuild")
  answers = data.get("answers")
  if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or len(set(answers)) != len(answers):
    raise ValueError(f"{path}: key 'answers' must be a list of distinct strings")
  if data.get("min_count") != min_count or data.get("num_records") != num_records:
    return None
  return answers


def _train_split(data_cfg: ml_collections.ConfigDict) -> str:
  return data_cfg.get("train_split", "train") or "train"


def answer_vocab(data_cfg: ml_collections.ConfigDict, train_index: Callable[[], SplitIndex] | None = None) -> list[str]:
  """VQA answers given at least `vqa_min_answer_count` times in the train split, most frequent first.

  Built once and saved beside the split's index; later calls read that small JSON file. `train_index`
  gives the train split's index with its answers when the vocabulary must be built (data/task_data.py
  passes its opened split; by default the split is opened here).
  """
  split, min_count = _train_split(data_cfg), int(data_cfg.vqa_min_answer_count)
  b = builders.builder(data_cfg, task_table.spec("vqa").schema)
  if split not in b.info.splits:
    raise ValueError(
        f"dataset {data_cfg.name!r} has no split {split!r} to build the answer vocabulary from; "
        f"it has {sorted(b.info.splits)}"
    )
  n = b.info.splits[split].num_examples
  path = os.path.join(sidecar_dir(data_cfg.data_dir, b), f"answer_vocab_{split}_min{min_count}.json")
  if os.path.isfile(path):
    vocab = load_vocab_file(path, min_count=min_count, num_records=n)
    if vocab is not None:
      return vocab
  index = train_index() if train_index is not None else open_split(data_cfg, "vqa", split, texts=True).index
  vocab = build_answer_vocab(index.answers, min_count)
  if not vocab:
    raise ValueError(
        f"{data_cfg.name}/{split}: no answer is given {min_count} times or more "
        "(lower config.data.vqa_min_answer_count)"
    )
  save_vocab_file(path, vocab, min_count=min_count, num_records=n, split=split)
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
