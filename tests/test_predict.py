"""predict: one-line errors naming the bad input, and the CLI's JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixelbert_jax import predict
from tests import train_helpers as th


@pytest.fixture(scope="module")
def workdir(tiny_pretrained):
  return tiny_pretrained


@pytest.fixture(scope="module")
def image(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "x.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(path)
  return path


def _cli(*args):
  proc = subprocess.run(
      [sys.executable, "-m", "pixelbert_jax.predict", *map(str, args)],
      cwd=th.REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bad,needle", [("missing", "does not exist"), ("text", "unreadable")])
def test_bad_images_are_named(workdir, tmp_path, bad, needle):
  path = tmp_path / "nope.jpg"
  if bad == "text":
    path.write_text("not an image")
  with pytest.raises(predict.PredictError, match=needle) as e:
    predict.Predictor(str(workdir)).score(str(path), "a red star")
  assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_empty_text_and_wrong_task(workdir, image):
  p = predict.Predictor(str(workdir))
  assert p.task == "pretrain" and p.model is p.context.model  # built through model_context.ModelContext
  with pytest.raises(predict.PredictError, match="empty caption"):
    p.rank(str(image), ["a red star", "  "])
  with pytest.raises(predict.PredictError, match="'pretrain' checkpoint; a question needs one of 'vqa'"):
    p.answer(str(image), "what color is the star")


def test_missing_checkpoint(tmp_path):
  with pytest.raises(predict.PredictError, match="does not exist"):
    predict.Predictor(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_cli_ranks_captions_and_reports_errors_in_one_line(workdir, image):
  rc, out, err = _cli("--checkpoint", workdir, "--image", image, "--captions", "a red star", "a blue ring")
  assert rc == 0, err[-2000:]
  ranking = json.loads(out)["ranking"]
  assert sorted(r["caption"] for r in ranking) == ["a blue ring", "a red star"]
  assert ranking[0]["score"] >= ranking[1]["score"]
  rc, out, err = _cli("--checkpoint", workdir, "--image", image, "--question", "what color is the star")
  assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ") and "'pretrain' checkpoint" in err
  rc, _, err = _cli("--checkpoint", workdir, "--image", "/no/such.png", "--caption", "x")
  assert rc == 2 and err.strip().splitlines()[-1] == "error: image /no/such.png does not exist"


@pytest.mark.slow
def test_tilde_and_relative_checkpoint_and_image(workdir, image, tmp_path, monkeypatch):
  """`--checkpoint=~/run` arrives with its `~` (bash expands none after `=`); relative paths are from the cwd."""
  home = tmp_path / "home"
  home.mkdir()
  (home / "run").symlink_to(workdir)
  (home / "x.jpg").symlink_to(image)
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(workdir.parent)
  expected = predict.Predictor(str(workdir)).score(str(image), "a red star")
  assert predict.Predictor("~/run").score("~/x.jpg", "a red star") == expected
  relative_image = os.path.relpath(image, workdir.parent)
  assert predict.Predictor(workdir.name).score(relative_image, "a red star") == expected
