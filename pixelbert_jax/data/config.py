"""Every data field with its default: `config.data` of the training configs."""

from __future__ import annotations

import os

import ml_collections

from pixelbert_jax import paths
from pixelbert_jax.data.datasets import CAPTION_DATASETS, DATASETS

# Buckets at the paper's sizes: shorter side 800 (R50) / 600 (X152) rounded up to 64, the common 4:3 and
# the longest allowed aspect, both orientations, and a square.
_R50_BUCKETS = ((832, 1344), (1344, 832), (832, 1088), (1088, 832), (832, 832))
_X152_BUCKETS = ((640, 1024), (1024, 640), (640, 832), (832, 640), (640, 640))


def check_name(name: str) -> list[str]:
  """The components of dataset name `name` (one, or several joined by '+'); ValueError if unknown."""
  parts = name.split("+")
  if len(parts) == 1:
    if name not in DATASETS:
      raise ValueError(
          f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, or a '+' mixture of "
          f"{', '.join(CAPTION_DATASETS)}"
      )
    return parts
  bad = [p for p in parts if p not in CAPTION_DATASETS]
  if bad or len(set(parts)) != len(parts):
    raise ValueError(
        f"dataset mixture {name!r}: components must be distinct caption datasets "
        f"({', '.join(CAPTION_DATASETS)}); not {bad or 'a repeated one'}"
    )
  return parts


def data_config(name: str = "synthetic") -> ml_collections.ConfigDict:
  """Data config for dataset `name`; image sizes are the demo's for synthetic and R50's otherwise."""
  parts = check_name(name)
  c = ml_collections.ConfigDict()
  c.name = name
  c.data_dir = paths.resolve(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  c.manual_dir = ""  # where the user put the raw files of a real dataset
  # a mixture's raw files: one folder per component (an empty one falls back to manual_dir)
  c.manual_dirs = ml_collections.ConfigDict({p: "" for p in parts}) if len(parts) > 1 else ml_collections.ConfigDict()
  c.exclude_coco_heldout = ""  # visual_genome: a dataset_coco.json whose val/test images VG leaves out
  c.train_split = "train"
  c.eval_split = DATASETS[name].eval_split if len(parts) == 1 else "val"
  c.builder_config = ""  # TFDS builder config of a real dataset, e.g. jsonl's 'captions' or 'vqa'
  c.vocab_path = ""  # BERT vocab.txt for real data; '' = the synthetic world's own vocab
  c.image_short_side = 800
  c.image_long_side = 1333
  c.buckets = _R50_BUCKETS
  c.max_image_pixels = 64_000_000  # larger originals are refused as decompression bombs
  c.max_text_len = 40
  c.mlm_prob = 0.15
  c.itm_neg_prob = 0.5
  c.vqa_min_answer_count = 9  # 3129 answers on VQA v2
  c.retrieval_negatives = 20
  c.num_workers = 0  # grain worker processes; 0 = decode in the main process
  c.prefetch = 2  # batches buffered per worker
  c.read_threads = 16  # grain's reader threads and buffered elements (per process, or per worker)
  c.read_buffer = 500
  c.max_bad_fraction = 0.01
  c.grounded_metric = name == "synthetic"
  c.synthetic = ml_collections.ConfigDict(
      dict(
          seed=0,
          image_size=192,
          num_train=4000,
          num_val=500,
          num_test=500,
          captions_per_image=5,
          questions_per_image=3,
          # scenes (data/synthetic.py SceneSpec): objects per image, radius as a fraction of the cell side
          min_objects=1,
          max_objects=3,
          radius_small=0.2,
          radius_large=0.38,
          # caption templates drawn uniformly (data/synthetic.py CAPTION_KINDS): there_is names one object,
          # relation relates two, shows lists them all
          caption_kinds=("there_is", "relation", "shows"),
      )
  )
  if name == "synthetic":
    c.image_short_side = 192
    c.image_long_side = 192
    c.buckets = ((192, 192),)
    c.read_threads, c.read_buffer = 2, 128  # 2 CPU cores: 305 -> 150 ms of CPU per batch of 64 (default 16, 500)
  return c


def paper_sizes(c: ml_collections.ConfigDict, cnn: str) -> ml_collections.ConfigDict:
  """Sets the paper's image sizes for `cnn` ('r50': 800/1333, 'x152': 600/1000) on config `c`."""
  if cnn == "r50":
    c.image_short_side, c.image_long_side, c.buckets = 800, 1333, _R50_BUCKETS
  elif cnn == "x152":
    c.image_short_side, c.image_long_side, c.buckets = 600, 1000, _X152_BUCKETS
  else:
    raise ValueError(f"paper image sizes exist for 'r50' and 'x152', not {cnn!r}")
  return c
