"""A frozen CNN's features, computed once per image (`config.cache_cnn_features`).

A frozen CNN (`model.cnn.frozen`: inference-mode batch norm, stop_gradient at C5, no updates) computes the
same C5 for an image at every step. Computing it once for every image of the dataset's image table and
feeding the cached C5 in place of the image leaves the steps to what trains: the 1x1 projection, pixel
sampling (still per step, with the step's key) and the transformer. The data pipeline then reads no JPEG.

The cache is the model's own `cnn_features` (models/pixel_bert.py) on the images as the pipeline decodes them
(its bucket, its mask), run on the run's mesh, kept in host memory (float32: 4 bytes x C5's size per image;
the demo's 5,000 images take 369 MB) and built again at every start, resumed runs included, so nothing about
it is stored or can go stale. Where it applies: one process, one image bucket, a frozen CNN, pre-training
(config_checks.py refuses the rest in one line).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from pixelbert_jax import partitioning
from pixelbert_jax.models import build


@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """C5 and the pixel mask of every row of a dataset's image table."""

  c5: np.ndarray  # float32 [rows, h, w, C]
  pixel_mask: np.ndarray  # bool [rows, (h // 2) * (w // 2)]

  def example(self, row: int) -> dict[str, np.ndarray]:
    """What an example carries in place of its image (tasks/pretrain.py CACHED_KEYS)."""
    if not 0 <= row < len(self.c5):
      raise IndexError(f"image row {row} outside the feature cache's {len(self.c5)} rows")
    return {"c5": self.c5[row], "pixel_mask": self.pixel_mask[row]}


def cnn_features_fn(context):
  """jit((params, batch_stats, image, image_mask) -> (c5, pixel_mask)) of the context's model."""

  def run(params, batch_stats, image, image_mask):
    return context.model.apply(build.variables(params, batch_stats), image, image_mask, method="cnn_features")

  return jax.jit(run, out_shardings=partitioning.replicated(context.mesh))


def build_cache(context, data, state, split: str) -> FeatureCache:
  """The cache of the image table behind `split` of `data` (data/task_data.py), from `state`'s CNN, in
  batches of `config.eval_batch_size`."""
  config = context.config
  source = data.split(split).source
  images = getattr(source, "images", None)
  if images is None:
    raise ValueError(f"config.cache_cnn_features: {data.split(split).name} has no image table to cache (a mixture)")
  examples = data.examples(split, seed=config.seed, train=False)
  bucket = tuple(config.data.buckets[0])
  fn = cnn_features_fn(context)
  size, rows = int(config.eval_batch_size), len(images)
  c5, masks = [], []
  t = time.monotonic()
  for start in range(0, rows, size):
    picked = list(range(start, min(start + size, rows)))
    decoded = [
        examples.image(r["image_bytes"], bucket, f"{split} image row {i}")
        for i, r in zip(picked, images.__getitems__(picked))
    ]
    pad = size - len(decoded)  # the last batch is padded to the compiled shape and cut back
    image = np.stack([d[0] for d in decoded] + [np.zeros_like(decoded[0][0])] * pad)
    mask = np.stack([d[1] for d in decoded] + [np.zeros_like(decoded[0][1])] * pad)
    batch = partitioning.global_batch({"image": image, "image_mask": mask}, context.mesh)
    with partitioning.activate(context.mesh):
      out = fn(state["params"], state["batch_stats"], batch["image"], batch["image_mask"])
    c5.append(np.asarray(out[0])[: len(picked)])
    masks.append(np.asarray(out[1])[: len(picked)])
  cache = FeatureCache(np.concatenate(c5), np.concatenate(masks))
  logging.info(
      "CNN features cached for %d images (C5 %s, %.0f MB) in %.1f s",
      rows,
      cache.c5.shape[1:],
      cache.c5.nbytes / 1e6,
      time.monotonic() - t,
  )
  return cache
