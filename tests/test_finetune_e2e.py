"""End to end on tiny sizes: pre-train a few steps, fine-tune every task from it, evaluate, write result
files, predict on one image."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest

from pixelbert_jax import predict, train
from pixelbert_jax.data import synthetic
from tests import finetune_helpers as fh
from tests import train_helpers as th


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=2), str(workdir))
  return workdir


def _finetune(task, data_dir, pretrained, tmp_path):
  config = fh.tiny_finetune_config(task, data_dir, total_steps=2, init_from=str(pretrained))
  final = train.train_and_evaluate(config, str(tmp_path))
  results = list((tmp_path / "results").iterdir())
  assert len(results) == 1, results
  return final, results[0]


@pytest.mark.slow
def test_vqa_finetune_writes_the_server_result_file(data_dir, pretrained, tmp_path):
  final, result = _finetune("vqa", data_dir, pretrained, tmp_path)
  assert 0.0 <= final["eval/vqa_acc"] <= 1.0 and np.isfinite(final["eval/loss"])
  records = json.loads(result.read_text())
  assert result.name == "vqa_val_step2.json"
  assert len(records) == 8 and all(set(r) == {"question_id", "answer"} for r in records)  # eval_steps=1 x 8
  assert len({r["question_id"] for r in records}) == 8
  vocab = json.loads((tmp_path / "answer_vocab.json").read_text())
  assert all(r["answer"] in vocab for r in records)
  meta_task = th.final_params(tmp_path)  # the checkpoint loads and has the VQA head
  assert any(k.startswith("params/vqa_head") for k in meta_task)


@pytest.mark.slow
def test_nlvr2_finetune_writes_identifier_csv(data_dir, pretrained, tmp_path):
  final, result = _finetune("nlvr2", data_dir, pretrained, tmp_path)
  assert 0.0 <= final["eval/consistency"] <= final["eval/acc"] + 1e-9 <= 1.0 + 1e-9
  rows = list(csv.reader(result.read_text().splitlines()))
  assert len(rows) == 8 and all(len(r) == 2 and r[1] in ("True", "False") for r in rows)
  assert all(r[0].startswith("synthetic-val-") for r in rows)


@pytest.mark.slow
def test_retrieval_finetune_keeps_the_pretrained_cnn_and_writes_ranks(data_dir, pretrained, tmp_path):
  final, result = _finetune("retrieval", data_dir, pretrained, tmp_path)
  for key in ("eval/tr_r1", "eval/ir_r1", "eval/tr_r10", "eval/pairs_per_s"):
    assert key in final, key
  assert final["eval/num_images"] == 8 and final["eval/pairs_scored"] == 8 * 40  # 8 images x 5 captions each
  ranks = json.loads(result.read_text())
  assert len(ranks["text_retrieval"]) == 8 and len(ranks["image_retrieval"]) == 40
  # init_from copied the encoder and the frozen CNN did not move (weights and BN statistics).
  pre, fine = th.final_params(pretrained), th.final_params(tmp_path)
  cnn_keys = [k for k in fine if "encoder/cnn/" in k]
  assert cnn_keys
  for k in cnn_keys:
    np.testing.assert_array_equal(fine[k], pre[k], err_msg=k)
  moved = [k for k in fine if k.startswith("params/encoder/bert") and not np.array_equal(fine[k], pre[k])]
  assert moved, "the transformer must have been fine-tuned"


@pytest.mark.slow
def test_predict_from_the_pretrained_and_a_vqa_checkpoint(data_dir, pretrained, tmp_path):
  objs = synthetic.make_scene(0, "test", 3, 192)
  image = tmp_path / "scene.png"
  from PIL import Image

  Image.fromarray(synthetic.render(0, "test", 3, objs, 192)).save(image)
  p = predict.Predictor(str(pretrained))
  ranked = p.rank(str(image), ["a red star", "the picture shows a blue ring"])
  assert len(ranked) == 2 and sum(r[2] for r in ranked) == pytest.approx(1.0, abs=1e-5)
  assert 0.0 <= p.score(str(image), "a red star")["match_probability"] <= 1.0
  vqa_dir = tmp_path / "vqa"
  train.train_and_evaluate(
      fh.tiny_finetune_config("vqa", data_dir, total_steps=1, init_from=str(pretrained)), str(vqa_dir)
  )
  answers = predict.Predictor(str(vqa_dir)).answer(str(image), "what color is the star", top_k=3)
  assert len(answers) == 3 and all(0.0 <= s <= 1.0 for _, s in answers)
  assert answers[0][1] >= answers[1][1] >= answers[2][1]


@pytest.mark.slow
def test_tilde_init_from_data_dir_and_relative_workdir(data_dir, pretrained, tmp_path, monkeypatch):
  """config.init_from='~/pre' (bash leaves a `~` after `=`) and a relative workdir, resolved where the
  config enters train_and_evaluate: the pre-trained CNN arrives, and config.json records absolute paths."""
  home = tmp_path / "home"
  home.mkdir()
  (home / "pre").symlink_to(pretrained)
  (home / "tfds").symlink_to(data_dir)
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(fh.tiny_finetune_config("vqa", "~/tfds", total_steps=1, init_from="~/pre"), "runs/vqa")
  workdir = tmp_path / "runs" / "vqa"
  saved = json.loads((workdir / "config.json").read_text())
  assert (saved["init_from"], saved["data"]["data_dir"]) == (str(home / "pre"), str(home / "tfds"))
  pre, fine = th.final_params(pretrained), th.final_params(workdir)
  cnn_keys = [k for k in fine if "encoder/cnn/" in k]
  assert cnn_keys and fine["step"] == 1
  for k in cnn_keys:  # the demo fine-tunes with the CNN frozen: equal only if init_from was read
    np.testing.assert_array_equal(fine[k], pre[k], err_msg=k)
