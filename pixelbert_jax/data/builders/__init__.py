"""TFDS builders, one module per dataset, and `data_source`: the random-access reader the pipeline uses.

A real dataset's module is imported only when asked for; data/datasets.py names its builder class.
"""

from __future__ import annotations

import ml_collections
import tensorflow_datasets as tfds

from pixelbert_jax import task_table
from pixelbert_jax.data.datasets import DATASETS, REAL_DATASETS


def builder_class(name: str) -> type:
  """The TFDS builder class of real dataset `name` (data/datasets.py), its module imported now."""
  if name not in REAL_DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: synthetic, {', '.join(REAL_DATASETS)}")
  return task_table.resolve(DATASETS[name].builder)


def scene_spec(data_cfg: ml_collections.ConfigDict):
  """The synthetic world's `SceneSpec` from `config.data.synthetic` (ValueError names a bad value)."""
  from pixelbert_jax.data import synthetic as world

  s = data_cfg.synthetic
  return world.SceneSpec(
      min_objects=int(s.min_objects),
      max_objects=int(s.max_objects),
      radius_small=float(s.radius_small),
      radius_large=float(s.radius_large),
  )


def builder(data_cfg: ml_collections.ConfigDict, schema: str) -> tfds.core.DatasetBuilder:
  """The prepared builder of `data_cfg.name` for `schema`; the synthetic world is generated on first use."""
  if data_cfg.name == "synthetic":
    from pixelbert_jax.data.builders import synthetic

    s = data_cfg.synthetic
    cfg = synthetic.synthetic_config(
        schema,
        seed=s.seed,
        image_size=s.image_size,
        num_train=s.num_train,
        num_val=s.num_val,
        num_test=s.num_test,
        captions_per_image=s.captions_per_image,
        questions_per_image=s.questions_per_image,
        scene=scene_spec(data_cfg),
        caption_kinds=tuple(s.caption_kinds),
    )
    return synthetic.prepare(cfg, data_cfg.data_dir)
  cls, dataset = builder_class(data_cfg.name), DATASETS[data_cfg.name]
  # Built from training, a real dataset gets the same bad-data knobs `prepare` offers.
  kwargs = {
      "data_dir": data_cfg.data_dir,
      "file_format": "array_record",
      "max_bad_fraction": float(data_cfg.max_bad_fraction),
      "max_pixels": int(data_cfg.max_image_pixels),
  }
  if data_cfg.get("builder_config"):
    kwargs["config"] = data_cfg.builder_config
  elif len(dataset.schemas) > 1:  # jsonl: the schema picks the config of its name
    kwargs["config"] = schema
  kwargs.update({key: data_cfg[key] for key in dataset.options if data_cfg.get(key)})
  b = cls(**kwargs)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir or None))
  return b


def data_source(data_cfg: ml_collections.ConfigDict, task: str, split: str):
  """Random-access source (len, [i]) of `split` in the schema `task` reads, each record with its image bytes."""
  from pixelbert_jax.data.builders import layout

  b = builder(data_cfg, task_table.spec(task).schema)
  return layout.open_split(b, split, dataset=data_cfg.name)[1]
