"""make_iterator and the global plan: contract, determinism, process-count invariance, exact resume, bad records."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from pixelbert_jax.data import pipeline
from pixelbert_jax.data.config import data_config
from pixelbert_jax.data.examples import PretrainExamples, record_buckets
from pixelbert_jax.data.plan import PAD_RECORD, GlobalPlan
from pixelbert_jax.data.retrieval_gallery import ImageExamples
from pixelbert_jax.data.sources import OpenSplit
from pixelbert_jax.data.split_index import SplitIndex

B, L = 4, 40


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  c = data_config("synthetic")
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.synthetic.num_train, c.synthetic.num_val, c.synthetic.num_test = 48, 30, 10
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _digest(image):
  return hashlib.sha1(image.tobytes()).hexdigest()


def test_batch_matches_contract(cfg):
  batch = next(pipeline.make_iterator(cfg, "pretrain", "train", batch_size=B, seed=0))
  expected = {
      "image": (np.uint8, (B, 192, 192, 3)),
      "image_mask": (np.bool_, (B, 192, 192)),
      "input_ids": (np.int32, (B, L)),
      "text_mask": (np.int32, (B, L)),
      "example_mask": (np.float32, (B,)),
      "mlm_labels": (np.int32, (B, L)),
      "mlm_weights": (np.float32, (B, L)),
      "mlm_grounded": (np.float32, (B, L)),
      "itm_label": (np.int32, (B,)),
  }
  assert set(batch) == set(expected)
  for k, (dtype, shape) in expected.items():
    assert batch[k].dtype == dtype and batch[k].shape == shape, (k, batch[k].dtype, batch[k].shape)
  tok = pipeline.tokenizer(cfg)
  assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
  assert (batch["mlm_weights"][batch["itm_label"] == 0] == 0).all()
  assert (batch["mlm_weights"][batch["itm_label"] == 1].sum(-1) >= 1).all()
  assert pipeline.vocab_size(cfg) == len(tok) and pipeline.num_examples(cfg, "val") == 30


def test_same_seed_same_batches_other_seed_differs(cfg):
  a = _take(pipeline.make_iterator(cfg, "pretrain", "train", batch_size=B, seed=1), 15)  # > 1 epoch
  b = _take(pipeline.make_iterator(cfg, "pretrain", "train", batch_size=B, seed=1), 15)
  for x, y in zip(a, b):
    _same(x, y)
  c = next(pipeline.make_iterator(cfg, "pretrain", "train", batch_size=B, seed=2))
  assert not np.array_equal(a[0]["input_ids"], c["input_ids"])
  # epoch 2 is reshuffled and re-masked: the batch after 48 examples differs from the first
  assert not all(np.array_equal(a[0][k], a[12][k]) for k in ("image", "input_ids"))


def test_train_epoch_covers_split_once_across_processes(cfg):
  seen = []
  for p in range(2):
    it = pipeline.make_iterator(cfg, "pretrain", "train", batch_size=B, seed=0, process_index=p, process_count=2)
    seen.append([_digest(img) for batch in _take(it, 6) for img in batch["image"]])  # 6 x 8 = one epoch of 48
  assert len(set(seen[0])) == len(set(seen[1])) == 24 and not set(seen[0]) & set(seen[1])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_after_n_batches_is_exact(cfg, workers):
  cfg = cfg.copy_and_resolve_references()
  cfg.num_workers = workers
  it = pipeline.make_iterator(cfg, "pretrain", "train", batch_size=B, seed=5)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  resumed = pipeline.make_iterator(cfg, "pretrain", "train", batch_size=B, seed=5)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 3)):
    _same(x, y)


def test_unknown_task_named(cfg):
  with pytest.raises(ValueError, match="captioning"):
    pipeline.make_iterator(cfg, "captioning", "train", batch_size=B, seed=0)


# ---- the plan alone ------------------------------------------------------------------------------------


def test_plan_batches_are_single_bucket_and_carry_leftovers_across_epochs():
  buckets = np.array([0, 1, 1, 2, 0, 1, 2, 2, 1, 0, 1] * 5)  # 55 records, three buckets, none a multiple of 8
  plan = GlobalPlan(buckets, global_batch=8, seed=3, train=True)
  counts = np.zeros(len(buckets), int)
  positions = []
  for step in range(30):  # 240 rows: every record 4 times, give or take what waits in a queue
    b, recs, pos = plan.batch(step)
    assert (buckets[recs] == b).all()
    np.add.at(counts, recs, 1)
    positions += pos.tolist()
  # a stream position (epoch * n + rank) is used once, and it names the record it was given to
  assert len(set(positions)) == len(positions)
  epochs = {}
  for p in positions:
    epochs.setdefault(p // len(buckets), []).append(p % len(buckets))
  assert all(len(set(ranks)) == len(ranks) for ranks in epochs.values())
  assert len(epochs[0]) == len(epochs[1]) == len(epochs[2]) == 55  # nothing dropped at epoch ends
  assert counts.min() >= 3 and counts.max() <= 5
  fresh = GlobalPlan(buckets, global_batch=8, seed=3, train=True)
  for step in (29, 3, 17):  # random access gives what sequential access gave
    np.testing.assert_array_equal(fresh.batch(step)[1], plan.batch(step)[1])


def test_plan_eval_pads_each_bucket_tail():
  buckets = np.array([0, 1, 1, 0, 1])
  plan = GlobalPlan(buckets, global_batch=2, seed=0, train=False)
  batches = [plan.batch(s) for s in range(plan.num_batches())]
  assert [(b, r.tolist()) for b, r, _ in batches] == [(1, [1, 2]), (0, [0, 3]), (1, [4, PAD_RECORD])]


def test_plan_refuses_buckets_smaller_than_global_batch():
  with pytest.raises(ValueError, match=r"bucket sizes \[3, 2\] < 4"):
    GlobalPlan(np.array([0, 0, 0, 1, 1]), global_batch=4, seed=0, train=True)


# ---- several buckets, through the real example code on an in-memory split ----------------------------


def _png(h, w, value):
  buf = io.BytesIO()
  Image.new("RGB", (w, h), (value, value, value)).save(buf, format="PNG")
  return buf.getvalue()


def _split(n, bad=()):
  records, sizes = [], []
  for i in range(n):
    h, w = (64, 128) if i % 3 else (128, 64)
    rec = {
        "image": _png(h, w, i),
        "image_id": f"img{i}".encode(),
        "captions": [b"a red circle", b"a blue star"],
        "height": h,
        "width": w,
    }
    if i in bad:
      rec["image"] = rec["image"][:30] if i % 2 else b""
    records.append(rec)
    sizes.append((h, w))
  index = SplitIndex(schema="captions", sizes=np.array(sizes, np.int32), ids=[f"img{i}" for i in range(n)])
  return OpenSplit(records, index, "mem/train", "captions")


def _mem_cfg(cfg, max_bad_fraction=0.5):
  c = cfg.copy_and_resolve_references()
  c.image_short_side, c.image_long_side, c.buckets = 64, 128, ((64, 128), (128, 64))
  c.max_bad_fraction = max_bad_fraction
  return c


def _iterator(opened, cfg, *, batch_size=B, p=0, P=1, train=True, seed=0, max_bad_fraction=0.5, examples=None):
  c = _mem_cfg(cfg, max_bad_fraction)
  examples = (examples or PretrainExamples)(opened, c, pipeline.vocab_path(c), seed=seed, train=train)
  return pipeline.planned_iterator(
      c, opened, examples, batch_size=batch_size, seed=seed, process_index=p, process_count=P, train=train
  )


def test_record_buckets_from_stored_sizes(cfg):
  c = _mem_cfg(cfg)
  assert record_buckets(np.array([[64, 128], [128, 64], [30, 90], [300, 100]]), c).tolist() == [0, 1, 0, 1]
  # an image pair shares the bucket that holds both
  assert record_buckets(np.array([[64, 128, 64, 128], [128, 64, 128, 64]]), c).tolist() == [0, 1]


def test_global_batches_do_not_depend_on_process_count(cfg):
  opened = _split(40)
  one = _iterator(opened, cfg, batch_size=8)
  two = [_iterator(opened, cfg, batch_size=4, p=p, P=2) for p in range(2)]
  shapes = set()
  for _ in range(12):  # 96 rows: more than two epochs of 40, several switches between the two buckets
    whole = next(one)
    halves = [next(it) for it in two]
    for k in whole:
      assert halves[0][k].shape == halves[1][k].shape, k  # every process agrees on shapes at every step
      np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]), err_msg=k)
    shapes.add(whole["image"].shape[1:3])
    assert whole["image_mask"].all()  # one bucket per batch: these images fill their bucket exactly
  assert shapes == {(64, 128), (128, 64)}


def test_eval_same_batch_count_on_every_process_and_covers_once(cfg):
  opened = _split(23)  # bucket sizes 15 and 8: both need a padded tail
  runs = [list(_iterator(opened, cfg, batch_size=3, p=p, P=2, train=False, examples=ImageExamples)) for p in range(2)]
  assert len(runs[0]) == len(runs[1])
  for a, b in zip(*runs):
    assert a["image"].shape == b["image"].shape
  got = [int(i) for run in runs for batch in run for i, m in zip(batch["image_index"], batch["example_mask"]) if m]
  assert sorted(got) == list(range(23))
  pads = [batch for run in runs for batch in run if not batch["example_mask"].all()]
  assert all(
      (b["image_index"][b["example_mask"] == 0] == -1).all() and not b["image"][b["example_mask"] == 0].any()
      for b in pads
  )


@pytest.mark.parametrize("P", [1, 2])
def test_resume_with_several_buckets_is_exact(cfg, P):
  opened = _split(30)
  it = _iterator(opened, cfg, batch_size=8 // P, p=P - 1, P=P, seed=4)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 6)
  resumed = _iterator(opened, cfg, batch_size=8 // P, p=P - 1, P=P, seed=4)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 6)):
    _same(x, y)


def test_bad_records_become_padding_rows_counted_and_named(cfg, caplog):
  opened = _split(30, bad=(4, 7))
  batches = list(_iterator(opened, cfg, train=False))
  assert sum(b["example_mask"].sum() for b in batches) == 28
  assert "mem/train[4] (id img4)" in caplog.text and "mem/train[7] (id img7)" in caplog.text
  it = _iterator(opened, cfg)
  train_batches = _take(it, 8)  # 32 rows: one epoch of 30 plus some
  assert it.get_state()["bad"] >= 2
  assert sum(b["example_mask"].sum() for b in train_batches) <= 32 - 2


def test_too_many_bad_records_stop_with_count_and_examples(cfg):
  opened = _split(12, bad=(1, 2, 3, 5))
  with pytest.raises(RuntimeError, match=r"4 of 12 records were bad.*mem/train\[1\].*0 bytes"):
    list(_iterator(opened, cfg, train=False, max_bad_fraction=0.1))


def test_empty_captions_are_bad_records(cfg):
  opened = _split(8)
  opened.source[3]["captions"] = [b"", b"  "]
  batches = list(_iterator(opened, cfg, train=False))
  assert sum(b["example_mask"].sum() for b in batches) == 7


def test_itm_label_cannot_be_read_off_the_masking(cfg):
  """Negatives are masked like positives (only their MLM weights are zero): otherwise "the caption has
  [MASK] tokens" gives the ITM label away and the model never needs the image."""
  mask_id = pipeline.tokenizer(cfg).mask_token_id
  batches = _take(pipeline.make_iterator(cfg, "pretrain", "train", batch_size=8, seed=3), 40)
  has_mask = np.concatenate([(b["input_ids"] == mask_id).any(axis=1) for b in batches])
  matched = np.concatenate([b["itm_label"] == 1 for b in batches])
  weights = np.concatenate([b["mlm_weights"].sum(axis=1) for b in batches])
  assert matched.sum() > 60 and (~matched).sum() > 60
  assert abs(has_mask[matched].mean() - has_mask[~matched].mean()) < 0.15
  assert (weights[~matched] == 0).all() and (weights[matched] > 0).all()


def test_eval_batches_carry_the_unmasked_caption(cfg):
  """Eval pre-training batches add `text_ids` (the caption before masking, for ITM); train batches don't."""
  train_batch = next(iter(pipeline.make_iterator(cfg, "pretrain", "train", batch_size=8, seed=0)))
  assert "text_ids" not in train_batch
  for b in _take(pipeline.make_iterator(cfg, "pretrain", "val", batch_size=8, seed=0, train=False), 3):
    restored = np.where(b["mlm_weights"] > 0, b["mlm_labels"], b["input_ids"])
    matched = b["itm_label"] == 1
    np.testing.assert_array_equal(b["text_ids"][matched], restored[matched])
    assert (b["text_ids"][b["example_mask"] == 0] == 0).all()


def test_itm_negatives_are_captions_of_other_images(cfg):
  """PretrainExamples draws the caption of an ITM negative from another image's record: each image's two
  captions spell its own number in digits, so the number read back from `text_ids` (the caption before
  masking) is the image's own for matched pairs and another image's for negatives. Drawing the negative from
  the image's own record (`self._records[index]`) makes every negative spell its own number."""
  n = 30
  records = [
      {
          "image": _png(64, 128, i),
          "image_id": f"img{i}".encode(),
          "captions": [" ".join(f"{i:02d}") + " a", " ".join(f"{i:02d}") + " the"],
          "height": 64,
          "width": 128,
      }
      for i in range(n)
  ]
  index = SplitIndex(schema="captions", sizes=np.array([(64, 128)] * n, np.int32), ids=[f"img{i}" for i in range(n)])
  opened = OpenSplit(records, index, "mem/train", "captions")
  c = _mem_cfg(cfg)
  examples = PretrainExamples(opened, c, pipeline.vocab_path(c), seed=0, train=False)
  tok = examples.tokenizer
  labels = []
  for i in range(n):
    ex = examples(i, i, 0)
    tokens = tok.convert_ids_to_tokens([t for t in ex["text_ids"].tolist() if t not in tok.all_special_ids])
    spelled = int(tokens[0] + tokens[1])
    labels.append(int(ex["itm_label"]))
    assert (spelled == i) == bool(ex["itm_label"]), (i, tokens, int(ex["itm_label"]))
  assert 0 < sum(labels) < n  # both kinds drawn (itm_neg_prob 0.5, fixed per record in evaluation)
