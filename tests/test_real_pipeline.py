"""The pipeline on real-format fixtures: bad-data knobs from training, mixtures, the cached split index."""

import os

import numpy as np
import pytest

from pixelbert_jax.data import pipeline, split_index, text
from pixelbert_jax.data.builders._common import TooManyBadRecordsError
from pixelbert_jax.data.config import data_config
from tests import fixtures_real as fx

WORDS = "a picture number caption region of image 0 1 2 3 4 5 6 7 8 9 what is the".split()


def _cfg(tmp_path, name, **manual):
  c = data_config(name)
  c.data_dir = str(tmp_path / "data")
  c.vocab_path = text.write_world_vocab(str(tmp_path / "vocab"), WORDS)
  c.image_short_side, c.image_long_side, c.buckets = 64, 128, ((64, 128), (128, 64))
  for key, value in manual.items():
    if key == "manual_dir":
      c.manual_dir = value
    else:
      c.manual_dirs[key] = value
  return c


def test_max_bad_fraction_reaches_the_builder_built_from_training(tmp_path):
  fx.write_coco_karpathy(str(tmp_path / "manual"))  # 1 of the 4 train images is truncated
  strict = _cfg(tmp_path, "coco_karpathy", manual_dir=str(tmp_path / "manual"))
  # train is the view karpathy_train + restval: the truncated image is 1 of karpathy_train's 3
  with pytest.raises(TooManyBadRecordsError, match=r"karpathy_train: 1 of 3 records skipped.*max_bad_fraction=0.01"):
    pipeline.num_examples(strict, "train")
  lenient = _cfg(tmp_path, "coco_karpathy", manual_dir=str(tmp_path / "manual"))
  lenient.max_bad_fraction = 0.5
  assert pipeline.num_examples(lenient, "train") == 3


def test_mixture_coco_karpathy_plus_visual_genome(tmp_path):
  coco = fx.write_coco_karpathy(str(tmp_path / "coco"), broken=False)
  vg = fx.write_visual_genome(str(tmp_path / "vg"))  # one of 5 VG images is missing
  c = _cfg(
      tmp_path, "coco_karpathy+visual_genome", coco_karpathy=str(tmp_path / "coco"), visual_genome=str(tmp_path / "vg")
  )
  c.max_bad_fraction = 0.25
  n_coco_train = sum(e["part"] in ("train", "restval") for e in coco.values())
  assert pipeline.num_examples(c, "train") == n_coco_train + len(vg)
  assert pipeline.num_examples(c, "val") == 1  # VG has no val: the mixture's val is COCO's
  data = pipeline.retrieval_gallery(c, "train")
  assert set(data.image_ids) == {k for k, e in coco.items() if e["part"] in ("train", "restval")} | set(vg)
  it = pipeline.make_iterator(c, "pretrain", "train", batch_size=2, seed=0, train=False)
  assert sum(int(b["example_mask"].sum()) for b in it) == n_coco_train + len(vg)
  with pytest.raises(ValueError, match="no component of 'coco_karpathy\\+visual_genome' has split 'nope'"):
    pipeline.num_examples(c, "nope")


def test_mixture_names_are_checked():
  assert data_config("coco_karpathy+visual_genome").manual_dirs.to_dict() == {"coco_karpathy": "", "visual_genome": ""}
  with pytest.raises(ValueError, match="caption datasets"):
    data_config("coco_karpathy+vqa2")
  with pytest.raises(ValueError, match="unknown dataset 'cocoa'"):
    data_config("cocoa")


def test_split_index_is_cached_and_rebuilt_only_when_stale(tmp_path, monkeypatch):
  fx.write_flickr30k(str(tmp_path / "manual"))
  c = _cfg(tmp_path, "flickr30k", manual_dir=str(tmp_path / "manual"))
  calls = []
  real_scan = split_index._scan
  monkeypatch.setattr(split_index, "_scan", lambda *a, **k: calls.append(a[2]) or real_scan(*a, **k))
  first = pipeline.num_examples(c, "train")
  again = pipeline.num_examples(c, "train")
  assert first == again == 2 and calls == ["flickr30k/train"]
  pipeline.retrieval_gallery(c, "train")  # captions were not in the first sidecar: one more scan for them
  pipeline.retrieval_gallery(c, "train")
  assert calls == ["flickr30k/train"] * 2
  [meta] = [os.path.join(d, f) for d, _, fs in os.walk(c.data_dir) for f in fs if f == "train.meta.npz"]
  with np.load(meta) as f:
    arrays = dict(f)
  np.savez(meta, **{**arrays, "n": np.int64(99)})  # as if the dataset had been rebuilt with other records
  assert pipeline.num_examples(c, "train") == 2 and len(calls) == 3
  np.savez(meta, **{**arrays, "format": np.int64(42)})
  with pytest.raises(ValueError, match=r"train\.meta\.npz: index sidecar format 42"):
    pipeline.num_examples(c, "train")


def test_jsonl_vqa_through_the_pipeline_picks_the_vqa_config(tmp_path):
  fx.write_jsonl_vqa(str(tmp_path / "manual"))
  c = _cfg(tmp_path, "jsonl", manual_dir=str(tmp_path / "manual"))
  c.vqa_min_answer_count = 3
  vocab = pipeline.answer_vocab(c)
  assert sorted(vocab) == ["0", "1", "2"]  # each train question has its own answer, given 3 times
  batch = next(pipeline.make_iterator(c, "vqa", "train", batch_size=1, seed=0))
  # 3 answers, all the same: our rule for n != 10 answers, min(1, 3 / min(3, 3)) = 1 (10 answers: 0.3 each)
  assert batch["vqa_targets"].shape == (1, 3) and batch["vqa_targets"].max() == pytest.approx(1.0)


def test_task_of_another_schema_is_refused(tmp_path):
  fx.write_flickr30k(str(tmp_path / "manual"))
  c = _cfg(tmp_path, "flickr30k", manual_dir=str(tmp_path / "manual"))
  with pytest.raises(ValueError, match="no vqa fields"):
    pipeline.num_examples(c, "train", "vqa")
