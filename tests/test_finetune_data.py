"""Fine-tuning pipelines on the embedded world: VQA, NLVR2, retrieval (train batches, eval data, look-ups)."""

import collections
import json

import numpy as np
import pytest

from pixelbert_jax.data import pipeline, vqa_answers
from pixelbert_jax.data.builders import layout
from pixelbert_jax.data.config import data_config

B, L = 4, 40


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = data_config("synthetic")
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.synthetic.num_train, c.synthetic.num_val, c.synthetic.num_test = 40, 12, 6
  c.retrieval_negatives = 3
  return c


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _raw_records(cfg, task, split):
  from pixelbert_jax.data import builders

  src = builders.data_source(cfg, task, split)
  return [src[i] for i in range(len(src))]


def _s(v):
  return v.decode() if isinstance(v, bytes) else v


# ------------------------------------------------------------------------------------------------ VQA
def test_answer_vocab_built_once_from_train_and_cheap_after(cfg, monkeypatch):
  vocab = pipeline.answer_vocab(cfg)
  counts = collections.Counter(_s(a) for r in _raw_records(cfg, "vqa", "train") for a in r["answers"])
  assert set(vocab) == {a for a, c in counts.items() if c >= cfg.vqa_min_answer_count}
  assert [counts[a] for a in vocab] == sorted((counts[a] for a in vocab), reverse=True)
  # the second call reads the saved file only: opening the split would fail now
  monkeypatch.setattr(layout, "open_split", lambda *a, **k: pytest.fail("answer_vocab re-read the split"))
  assert pipeline.answer_vocab(cfg) == vocab
  strict = cfg.copy_and_resolve_references()
  strict.vqa_min_answer_count = max(counts.values()) + 1
  monkeypatch.undo()
  with pytest.raises(ValueError, match="no answer is given"):
    pipeline.answer_vocab(strict)


def test_vqa_batches_targets_match_ground_truth(cfg):
  vocab = pipeline.answer_vocab(cfg)
  index = {a: k for k, a in enumerate(vocab)}
  gt = pipeline.vqa_ground_truth(cfg, "train")
  it = pipeline.make_iterator(cfg, "vqa", "train", batch_size=B, seed=0)
  for _ in range(3):
    batch = next(it)
    assert batch["vqa_targets"].shape == (B, len(vocab)) and batch["vqa_targets"].dtype == np.float32
    assert batch["question_id"].dtype == np.int64 and batch["input_ids"].shape == (B, L)
    for qid, target in zip(batch["question_id"], batch["vqa_targets"]):
      assert len(gt[int(qid)]["answers"]) == 10
      np.testing.assert_array_equal(target, vqa_answers.soft_targets(gt[int(qid)]["answers"], index))
      assert target.max() > 0  # the synthetic majority answer is always in the vocabulary


def test_vqa_ground_truth_and_eval_pass(cfg):
  records = _raw_records(cfg, "vqa", "val")
  gt = pipeline.vqa_ground_truth(cfg, "val")
  assert len(gt) == len(records) == pipeline.num_examples(cfg, "val", "vqa") == 36
  for r in records:
    qid = int(r["question_id"])
    assert gt[qid] == {
        "answers": [_s(a) for a in r["answers"]],
        "question_type": _s(r["question_type"]),
        "answer_type": _s(r["answer_type"]),
    }
  it = pipeline.make_iterator(cfg, "vqa", "val", batch_size=5, seed=0, train=False)
  qids = [int(q) for b in it for q, m in zip(b["question_id"], b["example_mask"]) if m]
  assert sorted(qids) == sorted(gt) and it.num_batches == 8  # 36 questions in batches of 5


# ---------------------------------------------------------------------------------------------- NLVR2
def test_nlvr2_batches_index_identifiers_and_labels(cfg):
  records = _raw_records(cfg, "nlvr2", "val")
  ids = pipeline.nlvr2_identifiers(cfg, "val")
  assert ids == [_s(r["identifier"]) for r in records]
  runs = [
      list(
          pipeline.make_iterator(
              cfg, "nlvr2", "val", batch_size=4, seed=0, process_index=p, process_count=2, train=False
          )
      )
      for p in range(2)
  ]
  assert len(runs[0]) == len(runs[1])
  seen = []
  for batch in (b for run in runs for b in run):
    assert batch["image1"].shape == batch["image"].shape and batch["image1_mask"].dtype == np.bool_
    for i, label, m, img, img1 in zip(
        batch["example_index"], batch["label"], batch["example_mask"], batch["image"], batch["image1"]
    ):
      if m:
        assert label == records[i]["label"] and not np.array_equal(img, img1)
        seen.append(int(i))
  assert sorted(seen) == list(range(len(records)))


def test_nlvr2_train_labels_balanced_and_resumable(cfg):
  it = pipeline.make_iterator(cfg, "nlvr2", "train", batch_size=B, seed=3)
  first = [next(it) for _ in range(10)]  # one epoch of 40 statements
  assert sum(int(b["label"].sum()) for b in first) == 20
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  again = pipeline.make_iterator(cfg, "nlvr2", "train", batch_size=B, seed=3)
  again.set_state(state)
  for x, y in zip(expected, [next(again) for _ in range(3)]):
    _same(x, y)


# ------------------------------------------------------------------------------------------- retrieval
def test_retrieval_train_own_caption_first_then_negatives(cfg):
  data = pipeline.retrieval_gallery(cfg, "train")
  N = cfg.retrieval_negatives
  tokenised = [{tuple(row) for row in data.input_ids[data.caption_image_index == i]} for i in range(data.num_images)]
  # eval order is record order (one bucket), so row r of batch t is image t * B + r
  it = pipeline.make_iterator(cfg, "retrieval", "train", batch_size=B, seed=0, train=False)
  for t, batch in enumerate(it):
    assert batch["input_ids"].shape == batch["text_mask"].shape == (B, 1 + N, L)
    for r in range(B):
      image = t * B + r
      assert tuple(batch["input_ids"][r, 0]) in tokenised[image]
      for k in range(1, 1 + N):  # each negative is a caption of some other image
        assert any(tuple(batch["input_ids"][r, k]) in tokenised[j] for j in range(data.num_images) if j != image)
  train = pipeline.make_iterator(cfg, "retrieval", "train", batch_size=B, seed=0)
  assert next(train)["input_ids"].shape == (B, 1 + N, L)


def test_retrieval_gallery_images_and_captions(cfg):
  data = pipeline.retrieval_gallery(cfg, "test")
  records = _raw_records(cfg, "retrieval", "test")
  assert data.num_images == len(records) == 6
  assert data.image_ids == [_s(r["image_id"]) for r in records]
  assert data.captions == [_s(c) for r in records for c in r["captions"]]
  assert data.caption_image_index.tolist() == [i for i, r in enumerate(records) for _ in r["captions"]]
  tok = pipeline.tokenizer(cfg)
  assert data.input_ids.shape == data.text_mask.shape == (30, L) and (data.input_ids[:, 0] == tok.cls_token_id).all()
  got = []
  for p in range(2):
    batches = list(data.image_batches(2, process_index=p, process_count=2))
    assert len(batches) == 2  # 6 images, global batch 4: one full batch and one padded
    got += [int(i) for b in batches for i, m in zip(b["image_index"], b["example_mask"]) if m]
    assert set(batches[0]) == {"image", "image_mask", "image_index", "example_mask"}
  assert sorted(got) == list(range(6))
  # the mapping view evaluators use: every image in index order, captions with their image
  assert len(data["image"]) == len(data["image_mask"]) == 6 and data.get("image_id") == data.image_ids
  first = next(data.image_batches(6))
  for i, img in zip(first["image_index"], first["image"]):
    np.testing.assert_array_equal(data["image"][int(i)], img)
  np.testing.assert_array_equal(data["caption_image"], data.caption_image_index)


def test_num_examples_per_task(cfg):
  s = cfg.synthetic
  assert pipeline.num_examples(cfg, "train", "pretrain") == pipeline.num_examples(cfg, "train", "retrieval") == 40
  assert pipeline.num_examples(cfg, "train", "vqa") == 40 * s.questions_per_image
  assert pipeline.num_examples(cfg, "test", "nlvr2") == 6
