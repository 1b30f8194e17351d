"""The data pipeline's one-call entry points, each over a `TaskData` of its own (data/task_data.py).

A run builds one `TaskData` and keeps it: these helpers open their split on every call, for scripts, tests and
single look-ups. Batches follow a global plan (data/plan.py): every process computes the same sequence of
global batches of G = batch_size * process_count records, all of one bucket, and takes rows [p*B, (p+1)*B).
So the batch of step t has the same shapes on every process, the concatenated global batch does not depend
on the process count, and per-example randomness is a function of (seed, stream position) only.
"""

from __future__ import annotations

import ml_collections

from pixelbert_jax.data.batches import BatchIterator, planned_iterator  # noqa: F401  (planned_iterator: the API)
from pixelbert_jax.data.retrieval_gallery import RetrievalGallery
from pixelbert_jax.data.task_data import TaskData

# Part of the pipeline's API, defined beside what they need.
from pixelbert_jax.data.text import tokenizer, vocab_path, vocab_size  # noqa: F401
from pixelbert_jax.data.vqa_answers import answer_vocab  # noqa: F401


def resolve_from_data(config: ml_collections.ConfigDict) -> None:
  """`TaskData.resolve_sizes`: the config's -1 sizes (`model.vocab_size`, VQA's `model.num_answers`) from
  the data it names, in place."""
  TaskData(config.data, config.task).resolve_sizes(config)


def num_examples(data_cfg: ml_collections.ConfigDict, split: str, task: str = "pretrain") -> int:
  """Records of `split` as `task` reads them: images (pretrain, retrieval), questions (vqa), statements (nlvr2)."""
  return TaskData(data_cfg, task).num_examples(split)


def vqa_ground_truth(data_cfg: ml_collections.ConfigDict, split: str) -> dict[int, dict]:
  """{question_id: {"answers": [raw annotator answers], "question_type": str, "answer_type": str}}."""
  return TaskData(data_cfg, "vqa").vqa_ground_truth(split)


def nlvr2_identifiers(data_cfg: ml_collections.ConfigDict, split: str) -> list[str]:
  """Identifier of each record of the split; batches carry the position in this list as `example_index`."""
  return TaskData(data_cfg, "nlvr2").nlvr2_identifiers(split)


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
  """This process's batches of `split` for `task` (`TaskData.iterator`); keys per docs/contracts.md."""
  return TaskData(data_cfg, task).iterator(
      split,
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
  return TaskData(data_cfg, task).plan_summary(split)
