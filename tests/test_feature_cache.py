"""`config.cache_cnn_features`: the frozen CNN's features, computed once per image, are what the frozen CNN
computes, bit for bit (a run on them against a run on images: tests/test_task_data.py)."""

import numpy as np
import pytest

from pixelbert_jax import config_checks, feature_cache, partitioning, train
from tests import train_helpers as th


def _config(data_dir, cache: bool):
  return th.demo_recipe_config(data_dir, cache_cnn_features=cache)


def test_the_cache_is_the_frozen_cnns_output(data_dir):
  """Every row of the image table, against the model's `cnn_features` on that image alone (a batch of one,
  where the cache ran batches of eval_batch_size), decoded by the data pipeline."""
  config = _config(data_dir, cache=True)
  context = train.Trainer(config, partitioning.make_mesh(config.mesh_shape))
  data, state = context.data, context.init_state(config.seed)
  cache = feature_cache.build_cache(context, data, state, "train")
  images = data.split("train").source.images
  assert len(cache.c5) == len(images) == 48 + 16 + 16  # every split's images
  examples = data.examples("train", seed=0, train=False)
  one = feature_cache.cnn_features_fn(context)
  for row in (0, 47, 48, 79):
    image, mask = examples.image(images[row]["image_bytes"], tuple(config.data.buckets[0]), f"row {row}")
    c5, pixel_mask = one(state["params"], state["batch_stats"], image[None], mask[None])
    np.testing.assert_array_equal(cache.c5[row], np.asarray(c5)[0])
    np.testing.assert_array_equal(cache.pixel_mask[row], np.asarray(pixel_mask)[0])
  assert cache.c5.dtype == np.float32 and cache.pixel_mask.all()  # 192 x 192 scenes: no padding
  with pytest.raises(IndexError, match="image row 80 outside the feature cache's 80 rows"):
    cache.example(80)


def test_the_cache_needs_a_frozen_cnn_one_bucket_and_pretraining(data_dir):
  config = _config(data_dir, cache=True)
  assert config_checks.problems(config) == []
  config.model.cnn.frozen = False
  config.data.buckets = ((192, 192), (128, 192))
  assert config_checks.problems(config) == [
      "config.cache_cnn_features=True needs config.model.cnn.frozen=True (a CNN that trains changes its features)",
      "config.cache_cnn_features=True needs one image bucket (config.data.buckets has 2)",
  ]
  assert any("runs in one process, not 2" in p for p in config_checks.device_problems(_config(data_dir, True), 2, 2))
