"""One opened dataset per run: a training run (pre-training with evaluations, VQA) opens each split once, and
`evaluate` on a finished run opens only the evaluated split and builds no optimizer."""

from __future__ import annotations

import collections
import contextlib
import pathlib

import ml_collections
import numpy as np
import pytest

from pixelbert_jax import evaluate, optim, train
from pixelbert_jax.data import pipeline, sources, vqa_answers
from pixelbert_jax.data.builders import layout
from pixelbert_jax.data.config import data_config
from pixelbert_jax.data.task_data import TaskData
from tests import finetune_helpers as fh
from tests import train_helpers as th


@contextlib.contextmanager
def counting_opens():
  """Counts every opening of a stored split (builders/layout.py's open_split, under every reader) by
  (dataset, split)."""
  counts: collections.Counter = collections.Counter()
  original = layout.open_split

  def counted(builder, split, *, dataset):
    counts[(dataset, split)] += 1
    return original(builder, split, dataset=dataset)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(layout, "open_split", counted)
    yield counts


def _no_optimizer(*args, **kwargs):
  raise AssertionError("optim.make_optimizer was called")


@pytest.fixture(scope="module")
def pretrain_run(data_dir, tmp_path_factory):
  """`th.demo_recipe_config`'s run, its split openings counted."""
  workdir = tmp_path_factory.mktemp("pretrain_opens")
  config = th.demo_recipe_config(data_dir)
  with counting_opens() as counts:
    final = train.train_and_evaluate(config, str(workdir))
  assert "eval/mlm_acc" in final
  return workdir, dict(counts)


@pytest.fixture(scope="module")
def vqa_run(data_dir, tmp_path_factory):
  """2 VQA steps with an evaluation after each, the answer count left -1 and the answer vocabulary built in the
  run (as on a first run: its saved file is deleted)."""
  workdir = tmp_path_factory.mktemp("vqa_opens")
  config = fh.tiny_finetune_config("vqa", data_dir, total_steps=2, eval_every_steps=1)
  config.model.num_answers = -1
  saved = list(pathlib.Path(data_dir).glob("pixelbert_index/**/answer_vocab_*.json"))
  assert saved
  for path in saved:
    path.unlink()
  with counting_opens() as counts:
    final = train.train_and_evaluate(config, str(workdir))
  assert "eval/vqa_acc" in final
  return workdir, dict(counts)


@pytest.mark.slow
def test_a_pretraining_run_opens_each_split_once(pretrain_run):
  _, counts = pretrain_run
  assert counts == {("synthetic", "train"): 1, ("synthetic", "val"): 1}, counts


@pytest.mark.slow
def test_a_run_on_cached_cnn_features_is_the_run_on_images(pretrain_run, data_dir, tmp_path):
  """config.cache_cnn_features (feature_cache.py): the same run on the frozen CNN's cached features writes
  the same metrics.jsonl (but for timing) and the same parameters, bit for bit, and opens no split more."""
  images, image_counts = pretrain_run
  with counting_opens() as counts:
    train.train_and_evaluate(th.demo_recipe_config(data_dir, cache_cnn_features=True), str(tmp_path))
  assert th.without_perf(th.metrics(tmp_path)) == th.without_perf(th.metrics(images))
  assert any("eval/mlm_acc_grounded" in row for row in th.metrics(tmp_path))
  th.assert_same_params(th.final_params(tmp_path), th.final_params(images))
  assert dict(counts) == image_counts


@pytest.mark.slow
def test_a_vqa_run_opens_each_split_once(vqa_run):
  _, counts = vqa_run
  assert counts == {("synthetic", "train"): 1, ("synthetic", "val"): 1}, counts


@pytest.mark.slow
@pytest.mark.parametrize("split", [None, "test"])
def test_evaluate_opens_only_the_evaluated_split_and_builds_no_optimizer(pretrain_run, split, monkeypatch):
  workdir, _ = pretrain_run
  monkeypatch.setattr(optim, "make_optimizer", _no_optimizer)
  with counting_opens() as counts:
    metrics = evaluate.evaluate(str(workdir), split)
  assert metrics["step"] == 4 and "eval/mlm_acc" in metrics
  assert dict(counts) == {("synthetic", split or "val"): 1}, counts


@pytest.mark.slow
def test_evaluate_of_a_vqa_run_opens_only_the_evaluated_split(vqa_run, monkeypatch):
  workdir, _ = vqa_run
  monkeypatch.setattr(optim, "make_optimizer", _no_optimizer)
  with counting_opens() as counts:
    metrics = evaluate.evaluate(str(workdir))
  assert metrics["step"] == 2 and "eval/vqa_acc" in metrics
  assert dict(counts) == {("synthetic", "val"): 1}, counts


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
  c = data_config("synthetic")
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.synthetic.num_train, c.synthetic.num_val, c.synthetic.num_test = 40, 12, 6
  c.retrieval_negatives = 3
  return c


def _first_batches(data: TaskData, split: str, train: bool) -> dict:
  return next(iter(data.iterator(split, batch_size=4, seed=0, train=train)))


@pytest.mark.parametrize("task", ["pretrain", "vqa", "nlvr2", "retrieval"])
def test_task_data_opens_each_split_once_whatever_is_asked(data_cfg, task, monkeypatch):
  """Everything a run asks of its data, twice over (two evaluations), from one opening of each split; the
  answers are those of the one-call helpers in data/pipeline.py."""
  pipeline.num_examples(data_cfg, "train", task)  # builds this schema's world before the counting
  for path in pathlib.Path(data_cfg.data_dir).glob("pixelbert_index/**/answer_vocab_*.json"):
    path.unlink()
  built = []
  real_build = vqa_answers.build_answer_vocab
  monkeypatch.setattr(vqa_answers, "build_answer_vocab", lambda *a, **k: built.append(1) or real_build(*a, **k))
  config = ml_collections.ConfigDict({"task": task, "data": data_cfg, "model": {"vocab_size": -1, "num_answers": -1}})
  with counting_opens() as counts:
    data = TaskData(data_cfg, task)
    data.resolve_sizes(config)
    n = data.num_examples("train")
    assert sum(data.plan_summary("train").values()) == n
    train_batch = _first_batches(data, "train", train=True)
    for _ in range(2):
      eval_batch = _first_batches(data, "val", train=False)
      if task == "vqa":
        truth = data.vqa_ground_truth("val")
      elif task == "nlvr2":
        identifiers = data.nlvr2_identifiers("val")
      elif task == "retrieval":
        gallery = data.retrieval_gallery("val")
  assert dict(counts) == {("synthetic", "train"): 1, ("synthetic", "val"): 1}, counts
  assert built == ([1] if task == "vqa" else [])
  assert config.model.vocab_size == pipeline.vocab_size(data_cfg) and n == pipeline.num_examples(
      data_cfg, "train", task
  )
  if task == "vqa":
    assert config.model.num_answers == len(data.answer_vocab()) == len(pipeline.answer_vocab(data_cfg))
    assert truth == pipeline.vqa_ground_truth(data_cfg, "val")
  if task == "nlvr2":
    assert identifiers == pipeline.nlvr2_identifiers(data_cfg, "val")
  if task == "retrieval":
    again = pipeline.retrieval_gallery(data_cfg, "val")
    assert gallery.captions == again.captions and (gallery.input_ids == again.input_ids).all()
  for batch, train in ((train_batch, True), (eval_batch, False)):
    split = "train" if train else "val"
    one_shot = next(iter(pipeline.make_iterator(data_cfg, task, split, batch_size=4, seed=0, train=train)))
    assert batch.keys() == one_shot.keys()
    for k in batch:
      np.testing.assert_array_equal(batch[k], one_shot[k], err_msg=k)


def test_texts_come_from_the_split_opened_already(data_cfg):
  """A split opened without its texts gets them from its sidecar, not by being opened again."""
  with counting_opens() as counts:
    opened = sources.open_split(data_cfg, "vqa", "val")
    assert opened.index.answers is None
    index = opened.with_texts()
  assert dict(counts) == {("synthetic", "val"): 1}
  assert index is opened.index and index.answers == sources.open_split(data_cfg, "vqa", "val", texts=True).index.answers
