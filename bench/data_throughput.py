"""Prints examples/s of the data path on this machine: the demo pipeline end to end (workers 0 and 2), and
paper-sized preprocessing (decode + resize + pad of a 640x480 JPEG to 800/1333 and 600/1000 buckets).

  python bench/data_throughput.py [--batches 30] [--data_dir /tmp/pixelbert_bench_tfds]
"""

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable from a checkout

import numpy as np
from PIL import Image

from pixelbert_jax.data import pipeline
from pixelbert_jax.data.config import data_config, paper_sizes
from pixelbert_jax.data.preprocess import decode_image, resize_and_pad


def bench_pipeline(data_dir: str, workers: int, batches: int, batch_size: int = 32) -> float:
  c = data_config("synthetic")
  c.data_dir, c.num_workers = data_dir, workers
  it = pipeline.make_iterator(c, "pretrain", "train", batch_size=batch_size, seed=0)
  next(it)  # start-up (workers, tokenizer) is not throughput
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - start)


def bench_preprocess(cnn: str, n: int = 40) -> float:
  c = paper_sizes(data_config("coco_karpathy"), cnn)
  rng = np.random.default_rng(0)
  buf = io.BytesIO()  # a COCO-like photo: 640x480 JPEG with texture
  Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
  data = buf.getvalue()
  start = time.perf_counter()
  for i in range(n):
    image = decode_image(data, name=f"bench{i}.jpg", max_pixels=c.max_image_pixels)
    resize_and_pad(image, short_side=c.image_short_side, long_side=c.image_long_side, buckets=c.buckets)
  return n / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "pixelbert_bench_tfds"))
  args = p.parse_args()
  print(f"cpu cores: {os.cpu_count()}")
  for workers in (0, 2):
    print(
        f"demo pretrain pipeline (192x192, batch 32), num_workers={workers}: "
        f"{bench_pipeline(args.data_dir, workers, args.batches):.0f} examples/s"
    )
  for cnn in ("r50", "x152"):
    print(f"paper preprocessing {cnn} (640x480 JPEG -> decode, resize, pad): {bench_preprocess(cnn):.1f} images/s")


if __name__ == "__main__":
  main()
