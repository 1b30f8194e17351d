"""Builds one real dataset from the files the user downloaded into ArrayRecord files that training reads.

  python -m pixelbert_jax.data.prepare --dataset coco_karpathy --manual_dir ~/data/coco --data_dir ~/tfds

Afterwards `tfds.data_source(NAME, data_dir=DATA_DIR)` reads it, with no TensorFlow installed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

import tensorflow_datasets as tfds

from pixelbert_jax import cli_errors, paths
from pixelbert_jax.data.builders import builder_class, layout
from pixelbert_jax.data.builders._common import DEFAULT_MAX_BAD_FRACTION, VERIFY_MODES, TooManyBadRecordsError
from pixelbert_jax.data.builders._read import RecordError
from pixelbert_jax.data.datasets import DATASETS, REAL_DATASETS
from pixelbert_jax.data.preprocess import DEFAULT_MAX_PIXELS


def prepare(
    dataset: str,
    *,
    manual_dir: str,
    data_dir: str,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    verify_images: str = "decode",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    builder_config: str | None = None,
    include_test_splits: bool = False,
    **builder_kwargs: Any,
) -> tfds.core.DatasetBuilder:
  """Builds `dataset` (a no-op when it is already built in data_dir) and returns its builder.

  include_test_splits: also build the splits the builder only builds when asked (VQA's test, test_dev).
  builder_kwargs go to that builder only (e.g. visual_genome's exclude_coco_heldout).
  """
  # '~' and relative paths (paths.py): TFDS would make a folder literally named '~', and records the data_dir.
  manual_dir, data_dir = paths.resolve(manual_dir), paths.resolve(data_dir)
  if builder_kwargs.get("exclude_coco_heldout"):
    builder_kwargs["exclude_coco_heldout"] = paths.resolve(builder_kwargs["exclude_coco_heldout"])
  if dataset not in REAL_DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(REAL_DATASETS)}")
  cls = builder_class(dataset)
  if getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
    # TFDS would stop with an AssertionError and its traceback.
    state = "is empty" if os.path.isdir(manual_dir) else "is a file" if os.path.exists(manual_dir) else "does not exist"
    raise FileNotFoundError(
        f"--manual_dir {manual_dir} {state}: put the downloaded {dataset} files there "
        "(which ones: docs/real_datasets.md)"
    )
  configs = [cfg.name for cfg in cls.BUILDER_CONFIGS]
  if configs and builder_config not in configs:
    raise ValueError(f"dataset {dataset!r} needs builder_config, one of {configs}; got {builder_config!r}")
  if builder_config and not configs:
    raise ValueError(f"dataset {dataset!r} has no builder configs; got builder_config={builder_config!r}")
  if builder_config:
    builder_kwargs["config"] = builder_config
  builder = cls(
      data_dir=data_dir,
      max_bad_fraction=max_bad_fraction,
      verify_images=verify_images,
      max_pixels=max_pixels,
      include_test_splits=include_test_splits,
      **builder_kwargs,
  )
  if include_test_splits and builder.data_path.exists():
    left_out = (builder.info.metadata or {}).get("left_out", {})
    if left_out:  # a second run would reuse the build and silently not add them
      raise ValueError(
          f"{builder.data_dir} was built without its test splits {sorted(left_out)}: delete that folder to "
          "rebuild with --include_test_splits"
      )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def summary(builder: tfds.core.DatasetBuilder) -> str:
  lines = [f"{builder.name} {builder.version} in {builder.data_dir}"]
  for split, info in sorted(builder.info.splits.items()):
    tally = getattr(builder, "tallies", {}).get(split)
    skipped = f", skipped {tally.skipped}, dropped empty texts {tally.dropped_texts}" if tally else ""
    what = "images (each stored once)" if split == layout.IMAGES_SPLIT else "examples"
    lines.append(f"  {split}: {info.num_examples} {what}{skipped}")
  meta = builder.info.metadata or {}
  for split, parts in sorted(meta.get("views", {}).items()):
    lines.append(f"  {split}: {layout.num_records(builder, split)} examples, read as {'+'.join(parts)} (not stored)")
  for split, file in sorted(meta.get("left_out", {}).items()):
    lines.append(f"  {split}: not built ({file} is there; --include_test_splits builds it)")
  name = f"{builder.name}/{builder.builder_config.name}" if builder.builder_config else builder.name
  lines.append(f"read with: tfds.data_source({name!r}, data_dir={builder._data_dir_root!r})")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m pixelbert_jax.data.prepare",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--dataset", required=True, choices=sorted(REAL_DATASETS))
  parser.add_argument("--builder_config", default=None, help="jsonl only: captions or vqa")
  parser.add_argument("--manual_dir", required=True, help="folder holding the downloaded files")
  parser.add_argument("--data_dir", required=True, help="where the built dataset goes")
  parser.add_argument(
      "--max_bad_fraction",
      type=float,
      default=DEFAULT_MAX_BAD_FRACTION,
      help="fail when more than this fraction of a split's records is skipped",
  )
  parser.add_argument(
      "--verify_images",
      choices=VERIFY_MODES,
      default="decode",
      help="decode: fully decode every image (catches truncation); header: faster",
  )
  parser.add_argument(
      "--max_pixels",
      type=int,
      default=DEFAULT_MAX_PIXELS,
      help="images with more pixels are refused (decompression bombs)",
  )
  parser.add_argument(
      "--include_test_splits",
      action="store_true",
      help="vqa2: also build test and test_dev (no answers; about 81k more images)",
  )
  parser.add_argument(
      "--exclude_coco_heldout",
      default=None,
      metavar="DATASET_COCO_JSON",
      help="visual_genome only: leave out VG images that are COCO Karpathy val/test images",
  )
  parser.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  args = parser.parse_args(argv)
  extra = {}
  if args.exclude_coco_heldout:  # an option of the builders data/datasets.py gives it to
    takers = [name for name in REAL_DATASETS if "exclude_coco_heldout" in DATASETS[name].options]
    if args.dataset not in takers:
      parser.error(f"--exclude_coco_heldout applies to --dataset {' or '.join(takers)} only")
    extra["exclude_coco_heldout"] = args.exclude_coco_heldout
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    builder = prepare(
        args.dataset,
        manual_dir=args.manual_dir,
        data_dir=args.data_dir,
        max_bad_fraction=args.max_bad_fraction,
        verify_images=args.verify_images,
        max_pixels=args.max_pixels,
        builder_config=args.builder_config,
        include_test_splits=args.include_test_splits,
        **extra,
    )
  except (RecordError, TooManyBadRecordsError, FileNotFoundError, ValueError) as e:
    # These messages already name the file, record and key; a traceback through TFDS adds nothing.
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return cli_errors.interrupted()
  except Exception as e:  # noqa: BLE001 - anything else is one line too; --verbose shows where
    return cli_errors.report(e, verbose=args.verbose)
  print(summary(builder))
  return 0


if __name__ == "__main__":
  sys.exit(main())
