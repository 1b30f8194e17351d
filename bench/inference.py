"""Pixel-BERT inference, JAX vs PyTorch on the same machine: batch-1 latency and cached-pixel ITM throughput.

  python bench/inference.py --workload demo                  # CPU: demo model, 192x192, a few minutes
  python bench/inference.py --workload r50 --dtype bfloat16 --json out.json      # a GPU
  python bench/inference.py --workload r50 --frameworks jax,torch,torch-compile
  python bench/inference.py --workload demo --frameworks jax --profile /tmp/prof   # top XLA ops of pair scoring

Two measurements per framework, both ITM scoring with the pre-training model in eval mode, all pixels:
  latency     one (image, caption) pair: the whole model, CNN included (R50 at 800x1344: 252 pixels,
              40 text tokens) -> P(match). Median and p10/p90 over --latency-iters calls.
  retrieval   the retrieval case: the pixels of --cache-images images are computed once with the model's
              `encode_image` (timed too: images/s) and kept on the device in the compute dtype; then
              batches of --pairs-batch (caption, image) pairs go through `fuse` + the ITM head only,
              gathering each pair's pixels from the cache. Reported in pairs/s.
`--attention dot_product` runs the JAX model with jax.nn.dot_product_attention (XLA's implementation: jax
does not pick cuDNN by itself), `--attention cudnn` with its cuDNN fused kernel (CUDA GPU, bfloat16),
instead of einsum + float32 softmax. Same weights on both sides (the Flax init
converted to PyTorch), so the scores must agree: the report gives the largest difference of P(match)
between frameworks over one batch of pairs (float32: ~1e-5; bfloat16: ~1e-2). bfloat16: JAX
model.dtype=bfloat16, torch autocast(bfloat16) + channels_last; float32 parameters on both sides. torch
runs under inference_mode; each framework in its own subprocess. JAX compiles with the library's options
(pixelbert_jax/xla_options.py; --xla-options none for XLA's defaults). On a CPU, JAX encodes and scores
pairs on 2 data-parallel CPU devices (--jax-cpu-devices), as training's retrieval evaluation does with
the demo configs' cpu_devices; batch-1 latency runs on one.
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py; puts the repo root on sys.path)

WORKLOADS = {
    # size, cnn, image, text_len, vocab, norm override; GPU and CPU sizes of the retrieval part
    "r50": dict(
        size="base",
        cnn="r50",
        image=(800, 1344),
        text_len=40,
        vocab="bert",
        norm=None,
        gpu=dict(pairs_batch=512, cache_images=64, encode_batch=16),
        cpu=dict(pairs_batch=8, cache_images=4, encode_batch=2),
    ),
    "x152": dict(
        size="base",
        cnn="x152",
        image=(600, 1024),
        text_len=40,
        vocab="bert",
        norm=None,
        gpu=dict(pairs_batch=512, cache_images=64, encode_batch=16),
        cpu=dict(pairs_batch=8, cache_images=4, encode_batch=2),
    ),
    "demo": dict(
        size="demo",
        cnn="demo",
        image=(192, 192),
        text_len=40,
        vocab="demo",
        norm="bn",
        gpu=dict(pairs_batch=4096, cache_images=512, encode_batch=256),
        cpu=dict(pairs_batch=256, cache_images=64, encode_batch=32),
    ),
}
FRAMEWORKS = ("jax", "torch", "torch-compile")
NUM_COMPARED = 64  # scores compared across frameworks


def workload_cfg(args):
  w = dict(WORKLOADS[args.workload])
  w["vocab"] = common.vocab_size(w["vocab"])  # "bert" or "demo" -> the size
  if args.image:  # e.g. the r50 model at a CPU-sized image, to check the code path
    w["image"] = tuple(int(v) for v in args.image.split("x"))
  cfg = common.model_cfg(w["size"], w["cnn"], w["vocab"], dtype=args.dtype, norm=w["norm"])
  cfg.attention_impl = args.attention  # JAX only (eval mode, so no attention dropout either way)
  if args.cnn_impl:
    cfg.cnn.impl = args.cnn_impl
  return w, cfg


def inputs(args, w):
  """NumPy inputs, the same in every worker: one latency pair, the images to cache, the pair batch."""
  import numpy as np

  rng = np.random.default_rng(0)
  one = dict(**common.image_batch(rng, 1, w["image"]), **common.text_batch(rng, 1, w["text_len"], w["vocab"]))
  images = common.image_batch(rng, args.cache_images, w["image"])
  pairs = common.text_batch(rng, args.pairs_batch, w["text_len"], w["vocab"])
  pairs["image_index"] = rng.integers(0, args.cache_images, (args.pairs_batch,), dtype=np.int32)
  return one, images, pairs


def timed(fn, sync, iters, warmup):
  """-> (first call s, per-call seconds, last result); `sync(result)` waits for the device."""
  t0 = time.perf_counter()
  out = sync(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup):
    out = sync(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    out = sync(fn())
    times.append(time.perf_counter() - t0)
  return first, times, out


def summary(framework, device, first_latency, latency, encode_s, first_pairs, pairs, args, scores, mem):
  return dict(
      framework=framework,
      device=device,
      latency_first_s=first_latency,
      latency=common.time_stats(latency),
      encode_images_per_s=args.cache_images / encode_s,
      pairs_first_s=first_pairs,
      pairs=common.time_stats(pairs),
      pairs_batch=args.pairs_batch,
      scores=[float(s) for s in scores[:NUM_COMPARED]],
      peak_mem_bytes=mem[0],
      peak_mem_kind=mem[1],
  )


# --------------------------------------------------------------------------------------------- JAX
def jax_worker(args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pixelbert_jax import distributed
  from pixelbert_jax.models.build import build_model

  distributed.set_cpu_devices(args.jax_cpu_devices)  # before the first jax.devices()
  w, cfg = workload_cfg(args)
  model = build_model(cfg, "pretrain")
  variables = common.init_flax(model, "pretrain")
  common.save_weights(args.weights, cfg, "pretrain", variables)
  one, images, pairs = inputs(args, w)
  one = jax.device_put(one)
  batched, batched_variables = jax.device_put, variables
  if common.jax_data_parallel(args) > 1:
    # As training's retrieval evaluation with config.cpu_devices: images and pairs split over a data
    # axis, the weights replicated. Batch-1 latency stays on one device.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(jax.devices()[: common.jax_data_parallel(args)], ("data",))
    batched = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    batched_variables = jax.device_put(variables, NamedSharding(mesh, P()))
  pairs = batched(pairs)
  options = common.jax_compiler_options(args)

  def p_match(m, pooled):
    return jax.nn.softmax(m.itm_head(pooled), axis=-1)[:, 1]

  @functools.partial(jax.jit, compiler_options=options)
  def score_full(v, x):
    return model.apply(v, **x, method=lambda m, **x: p_match(m, m.encoder(**x, train=False)["pooled"]))

  @functools.partial(jax.jit, compiler_options=options)
  def encode(v, image, image_mask):
    return model.apply(v, image, image_mask, method=lambda m, i, k: m.encode_image(i, k))

  @functools.partial(jax.jit, compiler_options=options)
  def score_pairs(v, cache, cache_mask, p):
    pixels, pixel_mask = cache[p["image_index"]], cache_mask[p["image_index"]]
    return model.apply(
        v, p["input_ids"], p["text_mask"], pixels, pixel_mask, method=lambda m, *a: p_match(m, m.fuse(*a)[1])
    )

  sync = jax.block_until_ready
  first_latency, latency, _ = timed(lambda: score_full(variables, one), sync, args.latency_iters, args.warmup)

  # The cache: encode once in chunks (first chunk compiles; timed from the second call on).
  chunks = [
      batched({k: v[s : s + args.encode_batch] for k, v in images.items()})
      for s in range(0, args.cache_images, args.encode_batch)
  ]
  enc = lambda c: encode(batched_variables, c["image"], c["image_mask"])
  sync(enc(chunks[0]))
  t0 = time.perf_counter()
  parts = [enc(c) for c in chunks]
  sync(parts)
  encode_s = time.perf_counter() - t0
  cache = jnp.concatenate([p[0] for p in parts])
  cache_mask = jnp.concatenate([p[1] for p in parts])
  del parts

  first_pairs, pair_times, scores = timed(
      lambda: score_pairs(batched_variables, cache, cache_mask, pairs), sync, args.pairs_steps, args.warmup
  )
  if args.profile:
    compiled = score_pairs.lower(batched_variables, cache, cache_mask, pairs).compile()
    _, prof = common.profile_jax(compiled, (batched_variables, cache, cache_mask, pairs), args.profile)
    common.print_profile(prof)
  result = summary(
      "jax",
      common.jax_device_name(),
      first_latency,
      latency,
      encode_s,
      first_pairs,
      pair_times,
      args,
      np.asarray(scores, np.float32),
      common.jax_peak_memory(),
  )
  return dict(result, xla_options=options)


# ------------------------------------------------------------------------------------------- torch
def torch_worker(args, compile_model):
  import torch

  device = common.torch_device()
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  w, cfg = workload_cfg(args)
  model = common.torch_model(cfg, "pretrain", args.weights)
  model.to(device).eval()
  if args.channels_last == "on":
    model.encoder.cnn.to(memory_format=torch.channels_last)
    model.encoder.visual.to(memory_format=torch.channels_last)
  to_dev = lambda d: {k: torch.from_numpy(v).to(device) for k, v in d.items()}
  one, images, pairs = (to_dev(x) for x in inputs(args, w))
  for d in (one, images):
    d["image_mask"] = d["image_mask"].bool()
  bf16 = args.dtype == "bfloat16"
  enc = model.encoder

  def score_full(x):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      return torch.softmax(model.itm_head(enc(**x)["pooled"]).float(), -1)[:, 1]

  def encode(image, image_mask):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      pixels, pixel_mask = enc.encode_image(image, image_mask)
    return pixels.to(torch.bfloat16 if bf16 else torch.float32), pixel_mask

  def score_pairs(cache, cache_mask, p):
    idx = p["image_index"].long()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      _, pooled = enc.fuse(p["input_ids"], p["text_mask"], cache[idx], cache_mask[idx])
      return torch.softmax(model.itm_head(pooled).float(), -1)[:, 1]

  if compile_model:
    score_full, encode, score_pairs = (torch.compile(f) for f in (score_full, encode, score_pairs))

  def sync(x):
    common.torch_sync(device)
    return x

  with torch.inference_mode():
    first_latency, latency, _ = timed(lambda: score_full(one), sync, args.latency_iters, args.warmup)
    chunks = range(0, args.cache_images, args.encode_batch)
    enc_chunk = lambda s: encode(
        images["image"][s : s + args.encode_batch], images["image_mask"][s : s + args.encode_batch]
    )
    sync(enc_chunk(0))
    t0 = time.perf_counter()
    parts = [enc_chunk(s) for s in chunks]
    sync(parts)
    encode_s = time.perf_counter() - t0
    cache = torch.cat([p[0] for p in parts])
    cache_mask = torch.cat([p[1] for p in parts])
    del parts
    first_pairs, pair_times, scores = timed(
        lambda: score_pairs(cache, cache_mask, pairs), sync, args.pairs_steps, args.warmup
    )
  return summary(
      "torch-compile" if compile_model else "torch",
      common.torch_device_name(device),
      first_latency,
      latency,
      encode_s,
      first_pairs,
      pair_times,
      args,
      scores.float().cpu().numpy(),
      common.torch_peak_memory(device),
  )


# ------------------------------------------------------------------------------------------ report
def report(args, results):
  header = (
      "framework",
      "device",
      "latency ms median",
      "p10-p90 ms",
      "first call s",
      "encode images/s",
      "pairs/s",
      "pair batch ms median",
      "p10-p90 ms",
      "first pair batch s",
      "peak mem GiB",
  )
  rows = []
  for r in results:
    if "error" in r:
      rows.append((r["framework"], "-", f"**{r['error']}**", *["-"] * 8))
      continue
    lat, pr = r["latency"], r["pairs"]
    rows.append(
        (
            r["framework"],
            r["device"],
            f"{lat['median_ms']:.2f}",
            f"{lat['p10_ms']:.2f}-{lat['p90_ms']:.2f}",
            f"{r['latency_first_s']:.1f}",
            f"{r['encode_images_per_s']:.1f}",
            f"{r['pairs_batch'] / (pr['median_ms'] / 1e3):.0f}",
            f"{pr['median_ms']:.1f}",
            f"{pr['p10_ms']:.1f}-{pr['p90_ms']:.1f}",
            f"{r['pairs_first_s']:.1f}",
            common.fmt(common.gib(r["peak_mem_bytes"]), ".2f"),
        )
    )
  v = common.versions()
  w, _ = workload_cfg(args)
  lines = [
      f"### inference: {args.workload} ({w['image'][0]}x{w['image'][1]}, "
      f"{common.num_pixel_tokens(w['image'])} pixels, {w['text_len']} tokens), {args.dtype}; latency: "
      f"batch 1, {args.latency_iters} calls; retrieval: {args.cache_images} cached images, "
      f"{args.pairs_batch} pairs per batch, {args.pairs_steps} batches; JAX attention: {args.attention}",
      "",
      common.markdown_table(header, rows),
      "",
      f"versions: jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, torch {v['torch']}, "
      f"transformers {v['transformers']}, python {v['python']}",
  ]
  ok = [r for r in results if "error" not in r]
  for r in ok[1:]:
    n = min(len(r["scores"]), len(ok[0]["scores"]))
    diff = max(abs(a - b) for a, b in zip(r["scores"][:n], ok[0]["scores"][:n]))
    lines.append(f"max |P(match) {r['framework']} - {ok[0]['framework']}| over {n} pairs: {diff:.2e}")
  mems = sorted({r["peak_mem_kind"] for r in ok})
  if mems:
    lines.append("peak memory: " + "; ".join(mems))
  lines += common.xla_options_line(args, ok)
  if not common.on_gpu():
    if any(r["framework"] == "jax" for r in ok):
      lines.append(
          "JAX CPU devices (data-parallel encoding and pair scoring, --jax-cpu-devices): "
          f"{common.jax_data_parallel(args)}"
      )
    lines.append(common.load_line(results))
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", default=None, choices=sorted(WORKLOADS), help="default: r50 on a GPU, demo")
  p.add_argument("--frameworks", default="jax,torch", help="comma list of " + ",".join(FRAMEWORKS))
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bfloat16 on a GPU")
  p.add_argument("--image", default=None, help="HxW instead of the workload's image size")
  p.add_argument("--latency-iters", type=int, default=None, help="default: 20 (GPU), 10 (CPU)")
  p.add_argument("--pairs-steps", type=int, default=10, help="timed batches of pairs")
  p.add_argument("--pairs-batch", type=int, default=None)
  p.add_argument("--cache-images", type=int, default=None)
  p.add_argument("--encode-batch", type=int, default=None)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument(
      "--attention",
      default="einsum",
      choices=["einsum", "dot_product", "cudnn"],
      help="JAX model.attention_impl (dot_product: jax.nn.dot_product_attention through XLA; "
      "cudnn: its cuDNN fused kernel, CUDA GPU and bfloat16 only)",
  )
  common.add_jax_cpu_devices_arg(p, "encoding and pair scoring")
  common.add_xla_options_arg(p)
  p.add_argument("--channels-last", default="on", choices=["on", "off"], help="torch CNN memory format")
  p.add_argument(
      "--cnn-impl",
      default=None,
      choices=["auto", "generic", "cpu"],
      help="JAX model.cnn.impl (default: the config's, auto = cpu on a CPU, generic elsewhere)",
  )
  p.add_argument("--json", default=None)
  p.add_argument(
      "--profile",
      default=None,
      metavar="DIR",
      help="after timing, trace 3 JAX pair-scoring batches into DIR and print the top XLA ops",
  )
  p.add_argument("--worker-timeout", type=float, default=1800, help="seconds per framework subprocess")
  p.add_argument("--in-process", action="store_true", help="run the frameworks in this process (tests)")
  p.add_argument("--weights", default=None, help=argparse.SUPPRESS)  # the initial weights, shared by workers
  p.add_argument("--worker", default=None, choices=FRAMEWORKS, help=argparse.SUPPRESS)
  p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  gpu = common.on_gpu()
  args.workload = args.workload or ("r50" if gpu else "demo")
  args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
  args.latency_iters = args.latency_iters or (20 if gpu else 10)
  if args.attention == "cudnn" and (not gpu or args.dtype != "bfloat16"):
    p.error(
        f"--attention cudnn needs a CUDA GPU and --dtype bfloat16 (here: "
        f"{'a GPU' if gpu else 'no GPU'}, {args.dtype})"
    )
  common.resolve_jax_cpu_devices(args)
  sizes = WORKLOADS[args.workload]["gpu" if gpu else "cpu"]
  for k, v in sizes.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.encode_batch = min(args.encode_batch, args.cache_images)
  args.cache_images += -args.cache_images % args.encode_batch  # equal chunks: one compiled encode
  n = common.jax_data_parallel(args)
  for name in ("pairs_batch", "encode_batch"):
    if getattr(args, name) % n:
      p.error(
          f"--{name.replace('_', '-')} {getattr(args, name)} must divide by the {n} JAX CPU devices "
          "(--jax-cpu-devices)"
      )
  return args


def run_one(args, framework):
  if framework == "jax":
    return jax_worker(args)
  return torch_worker(args, compile_model=framework == "torch-compile")


def main(argv=None):
  args = parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)
  if args.worker:
    common.worker_main(args, run_one)
    return
  save = lambda results: common.write_json(
      args.json,
      dict(
          mode="inference",
          workload=args.workload,
          dtype=args.dtype,
          args=vars(args),
          versions=common.versions(),
          results=results,
      ),
  )
  results = common.run_frameworks(__file__, args, argv, run_one, FRAMEWORKS, save, report)
  if any("error" in r for r in results):
    sys.exit(1)


if __name__ == "__main__":
  main()
