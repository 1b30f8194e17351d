"""Fine-tuning examples (VQA, NLVR2, retrieval) with the keys of docs/contracts.md "Fine-tuning batches"."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pixelbert_jax.data import text, vqa_answers
from pixelbert_jax.data.examples import BadRecordError, Examples, as_str


class VqaExamples(Examples):
  """image + question; `vqa_targets` soft scores over the answer vocabulary, `question_id` int64."""

  def __init__(self, opened, data_cfg, vocab_path, *, seed, train, answer_vocab: Sequence[str] | None = None):
    super().__init__(opened, data_cfg, vocab_path, seed=seed, train=train)
    vocab = vqa_answers.answer_vocab(data_cfg) if answer_vocab is None else answer_vocab
    self._answer_index = {a: k for k, a in enumerate(vocab)}

  @classmethod
  def from_data(cls, data, opened, *, seed, train):
    return cls(opened, data.config, data.vocab_path, seed=seed, train=train, answer_vocab=data.answer_vocab())

  def _padding_extra(self, h, w):
    return {"vqa_targets": np.zeros(len(self._answer_index), np.float32), "question_id": np.int64(-1)}

  def _example(self, index, record, position, bucket):
    name = self.record_name(index)
    image, image_mask = self.image(self._field(record, "image", index), bucket, name)
    question = as_str(self._field(record, "question", index)).strip()
    if not question:
      raise BadRecordError(f"{name}: empty question")
    ids, text_mask, _ = self.encode(question)
    answers = [as_str(a) for a in self._field(record, "answers", index)]
    return {
        "image": image,
        "image_mask": image_mask,
        "input_ids": ids,
        "text_mask": text_mask,
        "example_mask": np.float32(1),
        "vqa_targets": vqa_answers.soft_targets(answers, self._answer_index),
        "question_id": np.int64(record["question_id"]),
    }


class Nlvr2Examples(Examples):
  """left image as `image`, right as `image1` (one shared bucket), statement, `label`, `example_index`."""

  def _padding_extra(self, h, w):
    return {
        "image1": np.zeros((h, w, 3), np.uint8),
        "image1_mask": np.zeros((h, w), bool),
        "label": np.int32(0),
        "example_index": np.int64(-1),
    }

  def _example(self, index, record, position, bucket):
    name = self.record_name(index)
    image0, mask0 = self.image(self._field(record, "image0", index), bucket, f"{name} image0")
    image1, mask1 = self.image(self._field(record, "image1", index), bucket, f"{name} image1")
    sentence = as_str(self._field(record, "sentence", index)).strip()
    if not sentence:
      raise BadRecordError(f"{name}: empty sentence")
    label = int(self._field(record, "label", index))
    if label not in (0, 1):
      raise BadRecordError(f"{name}: label must be 0 or 1, got {label}")
    ids, text_mask, _ = self.encode(sentence)
    return {
        "image": image0,
        "image_mask": mask0,
        "image1": image1,
        "image1_mask": mask1,
        "input_ids": ids,
        "text_mask": text_mask,
        "example_mask": np.float32(1),
        "label": np.int32(label),
        "example_index": np.int64(index),
    }


class RetrievalExamples(Examples):
  """An image with its own caption first and `data.retrieval_negatives` captions of other images: [1+N, L].

  Negative captions come from the split's cached captions (the texts sidecar), so they cost no record reads.
  """

  def __init__(self, opened, data_cfg, vocab_path, *, seed, train):
    super().__init__(opened, data_cfg, vocab_path, seed=seed, train=train)
    negatives = data_cfg.retrieval_negatives
    captions = opened.with_texts().captions
    if captions is None:
      raise ValueError(f"{opened.name}: RetrievalExamples needs the split's captions: open it with texts=True")
    self._index = opened.index  # the index with the captions
    self._negatives = int(negatives)
    self._captions = [[c.strip() for c in caps if c.strip()] for caps in captions]
    if len(self._source) <= self._negatives:
      raise ValueError(f"{opened.name}: {len(self._source)} images cannot give {self._negatives} negatives each")

  def padding(self, bucket_id, position=-1):
    out = super().padding(bucket_id, position)
    out["input_ids"] = np.zeros((1 + self._negatives, self._max_len), np.int32)
    out["text_mask"] = np.zeros((1 + self._negatives, self._max_len), np.int32)
    return out

  def _example(self, index, record, position, bucket):
    name = self.record_name(index)
    image, image_mask = self.image(self._field(record, "image", index), bucket, name)
    own = self._captions[index]
    if not own:
      raise BadRecordError(f"{name}: no non-empty caption")
    rng = self.rng(position, index)
    ids, own_id = self._index.ids, self._index.ids[index]
    others = text.sample_retrieval_negatives(
        rng, len(self._source), index, self._negatives, lambda j: ids[j] == own_id or not self._captions[j]
    )
    chosen = [own[int(rng.integers(len(own)))]]
    chosen += [self._captions[j][int(rng.integers(len(self._captions[j])))] for j in others]
    encoded = [self.encode(c) for c in chosen]
    return {
        "image": image,
        "image_mask": image_mask,
        "input_ids": np.stack([e[0] for e in encoded]),
        "text_mask": np.stack([e[1] for e in encoded]),
        "example_mask": np.float32(1),
    }
