"""Peak memory of reading Visual Genome's region_descriptions.json and of building `visual_genome`, on a file
of the real size generated here: 108,077 images with ~50 regions each (5.4M regions, ~700 MB, the fields
and separators of VG v1.2).

  python -m bench.vg_memory [--images 108077] [--workdir /tmp/pixelbert_vg_bench] [--skip build]
  python -m bench.vg_memory --code /path/to/other/checkout ...   # the same measurements with other code

Each measurement runs in a fresh process and reports its peak resident memory (ru_maxrss) and its time:
- `import`: importing the builder module (the baseline the others include);
- `json.load`: the whole file as Python objects, then validated (how the builder read it before the stream);
- `stream`: `visual_genome.read_regions` of the code under test;
- `build`: the whole build (parse, image table, records) with every image a hard link to one of a few
  small JPEGs, so the run measures the annotations' cost, not the images'.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODES = ("import", "json.load", "stream", "build")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_IMAGES, REAL_REGIONS = 108_077, 5_408_689  # VG v1.2 region_descriptions.json
WORDS = (
    "man woman person shirt white black red blue green yellow tree sky building window car street sign "
    "table plate food glass water grass wall floor light head hair hand arm leg shadow cloud pole fence "
    "the a of on in with is has wearing large small wooden metal brick tall short open closed parked"
).split()


def generate(path: str, images: int, seed: int = 0) -> int:
  """Writes a region_descriptions.json of `images` images; returns its size in bytes."""
  rng = np.random.default_rng(seed)
  per_image = np.maximum(1, rng.poisson(REAL_REGIONS / REAL_IMAGES, images))
  region_id = 1
  with open(path, "w") as f:
    f.write("[")
    for i in range(images):
      image_id = i + 1
      n = int(per_image[i])
      lengths = rng.integers(2, 9, n)
      words = rng.integers(0, len(WORDS), int(lengths.sum()))
      xy = rng.integers(0, 800, (n, 4))
      regions, k = [], 0
      for r in range(n):
        phrase = " ".join(WORDS[w] for w in words[k : k + lengths[r]])
        k += lengths[r]
        regions.append(
            {
                "region_id": region_id,
                "width": int(xy[r, 0]),
                "height": int(xy[r, 1]),
                "image_id": image_id,
                "phrase": phrase,
                "y": int(xy[r, 2]),
                "x": int(xy[r, 3]),
            }
        )
        region_id += 1
      f.write(("" if i == 0 else ", ") + json.dumps({"regions": regions, "id": image_id}))
    f.write("]")
  return os.path.getsize(path)


def link_images(manual: str, images: int) -> None:
  """VG_100K/<id>.jpg for every image: hard links to 16 small distinct JPEGs."""
  from PIL import Image

  folder = os.path.join(manual, "VG_100K")
  os.makedirs(folder, exist_ok=True)
  sources = []
  for k in range(16):
    path = os.path.join(manual, f"source{k}.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (64 + k, 48), (16 * k, 100, 200)).save(buf, "JPEG")
    with open(path, "wb") as f:
      f.write(buf.getvalue())
    sources.append(path)
  for i in range(images):
    target = os.path.join(folder, f"{i + 1}.jpg")
    if not os.path.exists(target):
      os.link(sources[i % 16], target)


def _measure(mode: str, manual: str, data_dir: str) -> dict:
  """Runs in the child process."""
  regions = os.path.join(manual, "region_descriptions.json")
  start = time.perf_counter()
  if mode == "import":
    from pixelbert_jax.data.builders import visual_genome  # noqa: F401

    count = 0
  elif mode == "json.load":
    with open(regions, "rb") as f:
      records = json.load(f)
    count = sum(len([r["phrase"] for r in rec["regions"]]) for rec in records)  # what the old reader kept
  elif mode == "stream":
    from pixelbert_jax.data.builders import visual_genome

    regions = visual_genome.read_regions(regions)  # phrases: a list, or one JSON list per image
    count = sum(len(p if isinstance(p, list) else json.loads(p)) for _, p in regions)
  elif mode == "build":
    import tensorflow_datasets as tfds

    from pixelbert_jax.data.builders import visual_genome

    builder = visual_genome.VisualGenomeRegions(data_dir=data_dir, verify_images="header")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    count = builder.info.splits["train"].num_examples
  else:
    raise ValueError(mode)
  seconds = time.perf_counter() - start
  code = sys.modules["pixelbert_jax"].__file__ if "pixelbert_jax" in sys.modules else "-"
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"mode": mode, "count": count, "seconds": round(seconds, 1), "peak_mib": round(peak_kib / 1024), "code": code}


def run_child(mode: str, manual: str, data_dir: str, code: str) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--manual", manual, "--data_dir", data_dir]
  env = {**os.environ, "PYTHONPATH": code}
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)
  if out.returncode:
    raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=REAL_IMAGES)
  p.add_argument("--workdir", default="/tmp/pixelbert_vg_bench")
  p.add_argument("--code", default=REPO, help="checkout whose pixelbert_jax is measured")
  p.add_argument("--skip", nargs="*", default=[], choices=MODES)
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--manual", help=argparse.SUPPRESS)
  p.add_argument("--data_dir", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:  # PYTHONPATH (run_child) makes `pixelbert_jax` the --code checkout's
    print(json.dumps(_measure(args.child, args.manual, args.data_dir)))
    return
  manual = os.path.join(args.workdir, f"manual_{args.images}")
  regions = os.path.join(manual, "region_descriptions.json")
  os.makedirs(manual, exist_ok=True)
  if not os.path.isfile(regions):
    start = time.perf_counter()
    size = generate(regions + ".tmp", args.images)
    os.replace(regions + ".tmp", regions)
    print(f"generated {regions}: {size / 1e6:.0f} MB in {time.perf_counter() - start:.0f} s")
  print(f"region_descriptions.json: {os.path.getsize(regions) / 1e6:.0f} MB, {args.images} images; code {args.code}")
  if "build" not in args.skip:
    link_images(manual, args.images)
  for mode in MODES:
    if mode in args.skip:
      continue
    data_dir = os.path.join(args.workdir, f"data_{os.getpid()}")
    r = run_child(mode, manual, data_dir, args.code)
    what = "records" if mode == "build" else "phrases"
    print(f"{mode:10s} peak RSS {r['peak_mib']:6d} MiB  {r['seconds']:7.1f} s  ({r['count']} {what}; {r['code']})")
    subprocess.run(["rm", "-rf", data_dir], check=True)


if __name__ == "__main__":
  main()
