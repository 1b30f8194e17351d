"""User paths: `~` and relative paths resolved where they enter (paths.py); URLs kept.

The entry points that take paths are tested beside their own fixtures: main.py (test_train.py), init_from
(test_finetune_e2e.py), predict (test_predict.py), convert (test_convert_cli.py), data.prepare
(test_builders.py). Here: the resolver, the config keys it covers, and TFDS_DATA_DIR.
"""

from __future__ import annotations

import pytest

from pixelbert_jax import paths
from pixelbert_jax.data.config import data_config
from tests import train_helpers as th


@pytest.fixture
def home(tmp_path, monkeypatch):
  """HOME is a tmp folder and the working directory another, so '~' and relative paths differ from both."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  return tmp_path


def test_resolve(home):
  assert paths.resolve("~/tfds") == str(home / "home" / "tfds")
  assert paths.resolve("runs/a") == str(home / "cwd" / "runs" / "a")
  assert paths.resolve("../x") == str(home / "x")
  assert paths.resolve("/abs/x") == "/abs/x"
  for kept in ("gs://bucket/run", "s3://b/x", ""):
    assert paths.resolve(kept) == kept


def test_resolve_config_covers_every_path_key(home):
  config = th.load_config("pretrain", "r50")  # a mixture: it has manual_dirs per component
  config.init_from, config.init_from_torch = "~/pre", "init/torch"
  config.data.data_dir, config.data.manual_dir, config.data.vocab_path = "gs://b/tfds", "~/raw", "vocab.txt"
  config.data.exclude_coco_heldout = "~/coco/dataset_coco.json"
  config.data.manual_dirs.coco_karpathy, config.data.manual_dirs.visual_genome = "coco", ""
  paths.resolve_config(config)
  h, cwd = home / "home", home / "cwd"
  assert (config.init_from, config.init_from_torch) == (str(h / "pre"), str(cwd / "init" / "torch"))
  assert config.data.data_dir == "gs://b/tfds"
  assert (config.data.manual_dir, config.data.vocab_path) == (str(h / "raw"), str(cwd / "vocab.txt"))
  assert config.data.exclude_coco_heldout == str(h / "coco" / "dataset_coco.json")
  assert dict(config.data.manual_dirs) == {"coco_karpathy": str(cwd / "coco"), "visual_genome": ""}


@pytest.mark.parametrize(
    "value,expected", [("~/tfds", "home/tfds"), ("rel/tfds", "cwd/rel/tfds"), ("gs://b/tfds", None)]
)
def test_tfds_data_dir_environment_variable(home, monkeypatch, value, expected):
  monkeypatch.setenv("TFDS_DATA_DIR", value)
  assert data_config("synthetic").data_dir == (str(home / expected) if expected else value)


def test_tfds_data_dir_default_is_under_home(home, monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  assert data_config("coco_karpathy").data_dir == str(home / "home" / "tensorflow_datasets")
