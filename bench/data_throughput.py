"""Images/s of the input pipeline at the paper's sizes on this machine, per worker process and stage.

  python -m bench.data_throughput [--images 200] [--batches 20] [--workdir /tmp/pixelbert_data_bench] [--demo]

It makes its own photo-like JPEGs with COCO 2014's sizes (the longer side 640 for nearly all, landscape 4:3
and 3:2 most common, about a quarter portrait; ~160 KB each), five COCO-like captions per image, and a
BERT-sized vocabulary (30,522 entries), builds them as a `jsonl` captions dataset (layout 2: each image
once, read back through the image table), and uses R50's 800x1333 buckets (`paper_sizes(cfg, "r50")`).

Stages, each in this process on the same images (CPU time, so other load on the machine hardly counts):
decode (`decode_image`), resize (to the shorter side 800 / longer <= 1333), pad (into the planned bucket,
with its mask), tokenise (`text.encode`, 40 tokens), MLM/ITM (`text.mlm_mask` and the negative's draw),
and the whole example (`PretrainExamples`: record read, all of the above). Then the grain pipeline end to
end (`make_iterator`, pre-training, batch 8) with 0, 1 and 2 worker processes, with grain's reader threads
and buffer sized for this machine (2, 16) and as `config.data` sets them for real data (16, 500): images/s
in wall time, and per CPU second of the main process and its workers together (what a host pays).
`--demo` also times the demo's synthetic pipeline (192x192) with 0 and 2 workers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from pixelbert_jax.data import pipeline, text
from pixelbert_jax.data.config import data_config, paper_sizes
from pixelbert_jax.data.examples import PretrainExamples
from pixelbert_jax.data.preprocess import decode_image, resize_and_pad, resized_shape
from pixelbert_jax.data.sources import open_split

# (width, height) and share: an approximation of COCO 2014's image sizes
COCO_SIZES = (
    ((640, 480), 0.34),
    ((640, 427), 0.22),
    ((640, 426), 0.06),
    ((640, 425), 0.03),
    ((500, 375), 0.03),
    ((640, 360), 0.04),
    ((640, 640), 0.03),
    ((480, 640), 0.12),
    ((427, 640), 0.08),
    ((375, 500), 0.02),
    ((612, 612), 0.03),
)
SUBJECTS = "man woman dog cat giraffe bus train plate pizza skier surfer child elephant horse bench".split()
VERBS = "standing sitting riding eating walking holding looking lying parked flying".split()
PLACES = "street field kitchen table beach snow road water grass room park station".split()
R50_IMAGES_PER_S_PER_GPU = 275  # bench/README.md: JAX pre-training step, H200, 800x1344


def photo(width: int, height: int, rng: np.random.Generator) -> bytes:
  """A JPEG with a photo's entropy: smooth colour fields plus sensor-like noise (~160 KB at 640x480)."""
  coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
  smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
  noisy = np.clip(smooth + rng.normal(0.0, 18.0, smooth.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noisy).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def caption(rng: np.random.Generator) -> str:
  pick = lambda words: words[int(rng.integers(len(words)))]
  return f"a {pick(SUBJECTS)} {pick(VERBS)} on the {pick(PLACES)} next to a {pick(SUBJECTS)} in the {pick(PLACES)}"


def make_dataset(root: str, n: int, seed: int = 0) -> list[bytes]:
  """n COCO-sized JPEGs under root/images and root/train.jsonl (5 captions each); returns the JPEGs."""
  rng = np.random.default_rng(seed)
  sizes, shares = zip(*COCO_SIZES)
  picks = rng.choice(len(sizes), n, p=np.asarray(shares) / sum(shares))
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  jpegs = []
  with open(os.path.join(root, "train.jsonl"), "w") as f:
    for i, k in enumerate(picks):
      data = photo(*sizes[k], rng)
      with open(os.path.join(root, "images", f"{i}.jpg"), "wb") as img:
        img.write(data)
      jpegs.append(data)
      f.write(json.dumps({"image": f"images/{i}.jpg", "captions": [caption(rng) for _ in range(5)]}) + "\n")
  return jpegs


def write_vocab(directory: str) -> str:
  """Special tokens, every caption word, and fillers up to BERT's 30,522 entries."""
  words = sorted(set(SUBJECTS + VERBS + PLACES + "a on the next to in".split()))
  fillers = [f"w{i:05d}" for i in range(30522 - len(text.SPECIAL_TOKENS) - len(words))]
  return text.write_world_vocab(directory, words + fillers)


def config(workdir: str, manual: str, vocab: str, workers: int):
  c = paper_sizes(data_config("jsonl"), "r50")
  c.data_dir, c.manual_dir, c.builder_config, c.vocab_path = os.path.join(workdir, "tfds"), manual, "captions", vocab
  c.num_workers = workers
  return c


def cpu_rate(fn, items) -> tuple[float, list]:
  """Items per CPU second of fn over items, and its outputs."""
  start = time.process_time()
  out = [fn(x) for x in items]
  return len(items) / (time.process_time() - start), out


def stages(cfg, jpegs: list[bytes]) -> dict[str, float]:
  buckets = [tuple(b) for b in cfg.buckets]
  short, long = int(cfg.image_short_side), int(cfg.image_long_side)
  rates = {}
  rates["decode"], decoded = cpu_rate(lambda d: decode_image(d, name="bench"), jpegs)
  both, _ = cpu_rate(lambda a: resize_and_pad(a, short_side=short, long_side=long, buckets=buckets), decoded)
  resized = []
  for a in decoded:
    h, w = resized_shape(*a.shape[:2], short_side=short, long_side=long)
    resized.append(np.asarray(Image.fromarray(a).resize((w, h), Image.BICUBIC, reducing_gap=3.0)))
  # a resized image is only padded: the difference of the two is the resize
  rates["pad"], _ = cpu_rate(lambda a: resize_and_pad(a, short_side=short, long_side=long, buckets=buckets), resized)
  rates["resize"] = 1.0 / (1.0 / both - 1.0 / rates["pad"])
  tok = text.load_tokenizer(cfg.vocab_path)
  rng = np.random.default_rng(0)
  captions = [caption(rng) for _ in range(len(jpegs) * 10)]
  rates["tokenise"], encoded = cpu_rate(lambda s: text.encode(tok, s, int(cfg.max_text_len)), captions)

  def mlm_itm(e):
    ids, mask, _ = e
    r = np.random.default_rng(int(ids.sum()))
    matched = r.uniform() >= float(cfg.itm_neg_prob)
    if not matched:
      text.sample_other(r, len(captions), 0, lambda j: False)
    return text.mlm_mask(
        ids,
        mask,
        r,
        prob=float(cfg.mlm_prob),
        mask_id=tok.mask_token_id,
        special_ids=tok.all_special_ids,
        vocab_size=len(tok),
    )

  rates["MLM/ITM"], _ = cpu_rate(mlm_itm, encoded)
  return rates


def whole_example(cfg, n: int) -> float:
  opened = open_split(cfg, "pretrain", "train")
  examples = PretrainExamples(opened, cfg, cfg.vocab_path, seed=0, train=True)
  from pixelbert_jax.data.examples import record_buckets

  buckets = record_buckets(opened.index.sizes, cfg)
  rate, out = cpu_rate(lambda i: examples(i % len(opened.index), i, int(buckets[i % len(buckets)])), list(range(n)))
  assert not any("_bad" in o for o in out), [o["_bad"] for o in out if "_bad" in o][:3]
  return rate


def tree_cpu_seconds() -> float:
  """CPU seconds (user + system) of this process and its child processes (grain's workers), from /proc."""
  tick, me, total = os.sysconf("SC_CLK_TCK"), os.getpid(), 0.0
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
      continue
    if int(entry) == me or int(fields[1]) == me:
      total += (int(fields[11]) + int(fields[12])) / tick
  return total


def pipeline_rate(cfg, batches: int, batch_size: int = 8) -> tuple[float, float]:
  """(images/s in wall time, images per CPU second of the main process and its workers together)."""
  it = pipeline.make_iterator(cfg, "pretrain", "train", batch_size=batch_size, seed=0)
  next(it)  # start-up (workers, tokenizer) is not throughput
  start, cpu = time.perf_counter(), tree_cpu_seconds()
  for _ in range(batches):
    batch = next(it)
  wall, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu
  assert batch["image"].shape[1:3] in {tuple(b) for b in cfg.buckets}
  return batches * batch_size / wall, batches * batch_size / cpu


def demo_rate(data_dir: str, workers: int, batches: int, batch_size: int = 32) -> tuple[float, float]:
  c = data_config("synthetic")
  c.data_dir, c.num_workers = data_dir, workers
  return pipeline_rate(c, batches, batch_size)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "pixelbert_data_bench"))
  p.add_argument("--read_threads", type=int, default=2, help="grain reader threads per process (and the default's)")
  p.add_argument("--read_buffer", type=int, default=16, help="elements grain buffers per process")
  p.add_argument("--demo", action="store_true", help="also the demo's synthetic pipeline")
  args = p.parse_args()
  manual = os.path.join(args.workdir, f"coco_like_{args.images}")
  if not os.path.isfile(os.path.join(manual, "train.jsonl")):
    make_dataset(manual, args.images)
  jpegs = [open(os.path.join(manual, "images", f"{i}.jpg"), "rb").read() for i in range(args.images)]
  vocab = write_vocab(os.path.join(args.workdir, "vocab"))
  cfg = config(args.workdir, manual, vocab, workers=0)
  print(
      f"cpu cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; {args.images} JPEGs, mean "
      f"{np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB; buckets {list(map(tuple, cfg.buckets))}"
  )
  print("| stage | images/s per worker process (CPU time) |\n|---|---|")
  for name, rate in stages(cfg, jpegs).items():
    print(f"| {name} | {rate:,.0f} |")
  per_core = whole_example(cfg, args.images)
  print(f"| whole example (record read + all of the above) | {per_core:,.0f} |")
  print("\n| grain pipeline, batch 8 | read_threads, read_buffer | images/s (wall) | images per CPU second |")
  print("|---|---|---|---|")
  for threads, buffer in ((args.read_threads, args.read_buffer), (cfg.read_threads, cfg.read_buffer)):
    for workers in (0, 1, 2):
      c = config(args.workdir, manual, vocab, workers)
      c.read_threads, c.read_buffer = threads, buffer
      wall, cpu = pipeline_rate(c, args.batches)
      print(f"| num_workers={workers} | {threads}, {buffer} | {wall:,.1f} | {cpu:,.1f} |")
  print(f"load average after: {os.getloadavg()[0]:.1f}")
  cores = R50_IMAGES_PER_S_PER_GPU / per_core
  print(
      f"\nat {per_core:.0f} images/s per core, one GPU consuming {R50_IMAGES_PER_S_PER_GPU} images/s needs "
      f"{cores:.1f} worker cores, a host of 8 GPUs {8 * cores:.0f}"
  )
  if args.demo:
    for workers in (0, 2):
      wall, cpu = demo_rate(os.path.join(args.workdir, "tfds_demo"), workers, 30)
      print(
          f"demo pretrain pipeline (192x192, batch 32), num_workers={workers}: {wall:.0f} examples/s "
          f"({cpu:.0f} per CPU s)"
      )


if __name__ == "__main__":
  main()
