"""One run's data: the splits of `config.data` that one task reads, each opened at most once, and what is read
off them (sizes, vocabularies, ground truth, identifiers).

`train.Trainer` builds one `TaskData` and hands it to the task's evaluator; `evaluate` builds one for the
split it evaluates. Everything here is loaded on first use and kept, so a run opens each split it touches
once, builds the answer vocabulary once, and every periodic evaluation makes its iterator from the split
opened already. What is kept is small (the records' index, the texts the evaluators need); iterators,
retrieval galleries and their decoded images are made per use and not kept.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from pixelbert_jax import task_table
from pixelbert_jax.data import text, vqa_answers
from pixelbert_jax.data.batches import BatchIterator, planned_iterator
from pixelbert_jax.data.examples import Examples, record_buckets
from pixelbert_jax.data.retrieval_gallery import RetrievalGallery
from pixelbert_jax.data.sources import OpenSplit, open_split
from pixelbert_jax.data.split_index import SplitIndex


class TaskData:
  """The data of `data_cfg` (a run's `config.data`) as `task` reads it (its schema and examples)."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, task: str):
    self.spec = task_table.spec(task)
    self.config, self.task = data_cfg, task
    self._splits: dict[str, OpenSplit] = {}
    self._vocab_path: str | None = None
    self._answers: list[str] | None = None
    self._ground_truth: dict[str, dict[int, dict]] = {}
    # feature_cache.FeatureCache of a frozen CNN (config.cache_cnn_features): examples made from here on
    # carry the image's cached features in place of the image
    self.features = None

  # ------------------------------------------------------------------------------------ splits and sizes
  def split(self, name: str) -> OpenSplit:
    """Split `name` with its index, opened on first use (data/sources.py)."""
    if name not in self._splits:
      self._splits[name] = open_split(self.config, self.task, name)
    return self._splits[name]

  def texts(self, name: str) -> SplitIndex:
    """The index of split `name` with its texts (captions, or VQA answers), loaded on first use."""
    return self.split(name).with_texts()

  def num_examples(self, name: str) -> int:
    """Records of split `name` as the task reads them: images (pretrain, retrieval), questions (vqa),
    statements (nlvr2)."""
    return len(self.split(name).index)

  def plan_summary(self, name: str) -> dict[str, int]:
    """Records per bucket (as 'HxW'), to size batches against the buckets a dataset really fills."""
    sizes = self.split(name).index.sizes
    counts = np.bincount(record_buckets(sizes, self.config), minlength=len(self.config.buckets))
    return {f"{h}x{w}": int(c) for (h, w), c in zip(self.config.buckets, counts)}

  # ---------------------------------------------------------------------------------------- vocabularies
  @property
  def vocab_path(self) -> str:
    """The text vocabulary's file (the synthetic world's is written on first use)."""
    if self._vocab_path is None:
      self._vocab_path = text.vocab_path(self.config)
    return self._vocab_path

  @property
  def tokenizer(self):
    return text.load_tokenizer(self.vocab_path)

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  def answer_vocab(self) -> list[str]:
    """VQA's answer vocabulary (data/vqa_answers.py), from its file beside the train split's index or, when
    that is missing or stale, built from the train split (opened here, once, and kept for the run)."""
    if self._answers is None:
      train = self.config.get("train_split", "train") or "train"
      self._answers = vqa_answers.answer_vocab(self.config, train_index=lambda: self.texts(train))
    return self._answers

  @property
  def num_answers(self) -> int:
    return len(self.answer_vocab())

  def resolve_sizes(self, config: ml_collections.ConfigDict) -> None:
    """Replaces the config's -1 sizes by the data's, in place: those the task reads off the data
    (task_table.py `data_sizes`): `model.vocab_size` (the tokenizer's) and, for VQA, `model.num_answers`
    (the answer vocabulary of the train split). Configs leave them -1 so that loading one does no I/O and
    `--config.data.*` overrides apply before the data is opened."""
    for key in self.spec.data_sizes:
      if int(config.model[key]) == -1:
        config.model[key] = getattr(self, key)

  # ------------------------------------------------------------------------------------------- iterators
  def examples(self, name: str, *, seed: int, train: bool) -> Examples:
    """The task's record -> example function over split `name` (its `examples` class in task_table.py)."""
    examples_class = task_table.resolve(self.spec.examples)
    examples = examples_class.from_data(self, self.split(name), seed=seed, train=train)
    examples.features = self.features
    return examples

  def iterator(
      self,
      name: str,
      *,
      batch_size: int,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
      train: bool = True,
  ) -> BatchIterator:
    """This process's batches (batch_size rows each) of split `name`; keys per docs/contracts.md.

    train=True: infinite; every epoch a global permutation from (seed, epoch); randomness from
    (seed, stream position). train=False: one pass in record order with fixed randomness; every process
    yields the same number of batches with the same shapes; padding rows have example_mask=0.
    `num_batches` of the iterator is that count (None for train).
    """
    return planned_iterator(
        self.config,
        self.split(name),
        self.examples(name, seed=seed, train=train),
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        train=train,
    )

  # ---------------------------------------------------------------------------- what evaluators look up
  def vqa_ground_truth(self, name: str) -> dict[int, dict]:
    """{question_id: {"answers": [raw annotator answers], "question_type": str, "answer_type": str}}."""
    if name not in self._ground_truth:
      index = self.texts(name)
      self._ground_truth[name] = {
          int(q): {"answers": list(a), "question_type": qt, "answer_type": at}
          for q, a, qt, at in zip(index.question_ids, index.answers, index.question_types, index.answer_types)
      }
    return self._ground_truth[name]

  def nlvr2_identifiers(self, name: str) -> list[str]:
    """Identifier of each record of the split; batches carry the position in this list as `example_index`."""
    return self.split(name).index.ids

  def retrieval_gallery(self, name: str) -> RetrievalGallery:
    """Every image of split `name` (batched with its index) and every caption with its image's index; a new
    gallery per call (it may hold the split's decoded images), over the split opened once."""
    return RetrievalGallery(self.config, name, opened=self.split(name))
