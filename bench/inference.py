"""Pixel-BERT inference, JAX vs PyTorch on the same machine: batch-1 latency and cached-pixel ITM throughput.

  python -m bench.inference --workload demo                  # CPU: the demo model, a few minutes
  python -m bench.inference --workload r50 --json out.json    # a GPU: configs/pretrain.py:r50 (bfloat16)
  python -m bench.inference --workload r50 --frameworks jax,torch,torch-compile
  python -m bench.inference --workload demo --frameworks jax --profile /tmp/prof   # top XLA ops of pair scoring

Workloads are the pre-training configs (r50, x152, demo: configs/pretrain.py's variants), with `--set
KEY=VALUE` overrides (`--set model.dtype=float32`); the image is the config's largest bucket (`--image HxW`).

Two measurements per framework, both ITM scoring with the pre-training model in eval mode, all pixels:
  latency     one (image, caption) pair: the whole model, CNN included (R50 at 832x1344: 273 pixels,
              40 text tokens) -> P(match). Median and p10/p90 over --latency-iters calls.
  retrieval   the retrieval case: the pixels of --cache-images images are computed once with the model's
              `encode_image` (timed too: images/s) and kept on the device in the compute dtype; then
              batches of --pairs-batch (caption, image) pairs go through `fuse` + the ITM head only,
              gathering each pair's pixels from the cache. Reported in pairs/s.
`--attention dot_product` runs the JAX model with jax.nn.dot_product_attention (XLA's implementation: jax
does not pick cuDNN by itself), `--attention cudnn` with its cuDNN fused kernel (CUDA GPU, bfloat16),
instead of einsum + float32 softmax. Same weights on both sides (the Flax init
converted to PyTorch), so the scores must agree: the report gives the largest difference of P(match)
between frameworks over one batch of pairs (float32: ~1e-5; bfloat16: ~1e-2). model.dtype=bfloat16: JAX
computes in bfloat16, torch under autocast(bfloat16) + channels_last; float32 parameters on both sides. torch
runs under inference_mode; each framework in its own subprocess. The JAX side is the config's
`model_context.ModelContext` on the config's mesh (the CPU split into `config.cpu_devices`, as in training),
with the trainer's initial weights for the config's seed; encoding and pair scoring split their batches over
its data axis, as training's retrieval evaluation does, with the logical sharding rules active, while
batch-1 latency runs on one device. JAX compiles with the library's options (pixelbert_jax/xla_options.py;
`XLA_FLAGS=--xla_multiheap_size_constraint_per_heap=-1` for XLA's defaults).
"""

import argparse
import functools
import os
import sys
import time

from bench import measure, tables, weights, workers, workloads, xla_profile

WORKLOADS = {
    # the pre-training config; GPU and CPU sizes of the retrieval part
    "r50": (
        workloads.Workload("pretrain.py:r50", "BERT-base + ResNet-50"),
        dict(
            gpu=dict(pairs_batch=512, cache_images=64, encode_batch=16),
            cpu=dict(pairs_batch=8, cache_images=4, encode_batch=2),
        ),
    ),
    "x152": (
        workloads.Workload("pretrain.py:x152", "BERT-base + ResNeXt-152 32x4d"),
        dict(
            gpu=dict(pairs_batch=512, cache_images=64, encode_batch=16),
            cpu=dict(pairs_batch=8, cache_images=4, encode_batch=2),
        ),
    ),
    "demo": (
        workloads.Workload("pretrain.py:demo", "the README's demo model"),
        dict(
            gpu=dict(pairs_batch=4096, cache_images=512, encode_batch=256),
            cpu=dict(pairs_batch=256, cache_images=64, encode_batch=32),
        ),
    ),
}
FRAMEWORKS = ("jax", "torch", "torch-compile")
NUM_COMPARED = 64  # scores compared across frameworks


def load_config(args):
  config = workloads.load(WORKLOADS[args.workload][0], args.set)
  config.model.attention_impl = args.attention  # JAX only (eval mode, so no attention dropout either way)
  return config


def inputs(args, config):
  """NumPy inputs, the same in every worker: one latency pair, the images to cache, the pair batch."""
  import numpy as np

  rng = np.random.default_rng(0)
  hw, length, vocab = workloads.image_hw(config, args.image), config.data.max_text_len, config.model.vocab_size
  one = dict(**workloads.image_batch(rng, 1, hw), **workloads.text_batch(rng, 1, length, vocab))
  images = workloads.image_batch(rng, args.cache_images, hw)
  pairs = workloads.text_batch(rng, args.pairs_batch, length, vocab)
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
  return {
      "framework": framework,
      "device": device,
      "latency_first_s": first_latency,
      "latency": measure.time_stats(latency),
      "encode_images_per_s": args.cache_images / encode_s,
      "pairs_first_s": first_pairs,
      "pairs": measure.time_stats(pairs),
      "pairs_batch": args.pairs_batch,
      "scores": [float(s) for s in scores[:NUM_COMPARED]],
      "peak_mem_bytes": mem[0],
      "peak_mem_kind": mem[1],
  }


# --------------------------------------------------------------------------------------------- JAX
def jax_worker(args):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pixelbert_jax import distributed, model_context, partitioning

  config = load_config(args)
  if not args.in_process:
    distributed.set_cpu_devices(int(config.cpu_devices))  # before the first jax.devices(), as main.py
  ctx = model_context.ModelContext(config, partitioning.make_mesh(config.mesh_shape))
  init = weights.init_on_cpu(config)
  weights.save(args.weights, config, init)
  init = {"params": init["params"], "batch_stats": init["batch_stats"]}
  model, mesh = ctx.model, ctx.mesh
  # Batch-1 latency on one device; encoding and pair scoring over the mesh, the weights placed as the
  # context's shardings say, each batch split over the data axis.
  variables = jax.device_put(init, jax.devices()[0])
  batched_variables = jax.device_put(init, ctx.variable_shardings)
  batched = lambda x: {k: jax.device_put(v, partitioning.batch_sharding(mesh, np.ndim(v))) for k, v in x.items()}
  one, images, pairs = inputs(args, config)
  one = jax.device_put(one, jax.devices()[0])
  pairs = batched(pairs)
  options = ctx.compiler_options

  def p_match(m, pooled):
    return jax.nn.softmax(m.itm_head(pooled), axis=-1)[:, 1]

  @functools.partial(jax.jit, compiler_options=options)
  def score_full(v, x):
    return model.apply(v, **x, method=lambda m, **x: p_match(m, m.encoder(**x, train=False)["pooled"]))

  @functools.partial(jax.jit, compiler_options=options)
  def encode_fn(v, image, image_mask):
    return model.apply(v, image, image_mask, method=lambda m, i, k: m.encode_image(i, k))

  @functools.partial(jax.jit, compiler_options=options)
  def score_pairs_fn(v, cache, cache_mask, p):
    pixels, pixel_mask = cache[p["image_index"]], cache_mask[p["image_index"]]
    return model.apply(
        v, p["input_ids"], p["text_mask"], pixels, pixel_mask, method=lambda m, *a: p_match(m, m.fuse(*a)[1])
    )

  def on_mesh(fn):  # traced with the mesh and the logical rules, as training's evaluation
    def call(*a):
      with partitioning.activate(mesh):
        return fn(*a)

    return call

  encode, score_pairs = on_mesh(encode_fn), on_mesh(score_pairs_fn)

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
    with partitioning.activate(mesh):
      compiled = score_pairs_fn.lower(batched_variables, cache, cache_mask, pairs).compile()
    _, prof = xla_profile.profile_jax(compiled, (batched_variables, cache, cache_mask, pairs), args.profile)
    xla_profile.print_profile(prof)
  result = summary(
      "jax",
      measure.jax_device_name(),
      first_latency,
      latency,
      encode_s,
      first_pairs,
      pair_times,
      args,
      np.asarray(scores, np.float32),
      measure.jax_peak_memory(),
  )
  return dict(result, xla_options=options, mesh=dict(mesh.shape))


# ------------------------------------------------------------------------------------------- torch
def torch_worker(args, compile_model):
  import torch

  device = measure.torch_device()
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  config = load_config(args)
  model = weights.torch_model(config, args.weights)
  model.to(device).eval()
  if args.channels_last == "on":
    model.encoder.cnn.to(memory_format=torch.channels_last)
    model.encoder.visual.to(memory_format=torch.channels_last)
  to_dev = lambda d: {k: torch.from_numpy(v).to(device) for k, v in d.items()}
  one, images, pairs = (to_dev(x) for x in inputs(args, config))
  bf16 = config.model.dtype == "bfloat16"
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
    measure.torch_sync(device)
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
      measure.torch_device_name(device),
      first_latency,
      latency,
      encode_s,
      first_pairs,
      pair_times,
      args,
      scores.float().cpu().numpy(),
      measure.torch_peak_memory(device),
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
            tables.fmt(tables.gib(r["peak_mem_bytes"]), ".2f"),
        )
    )
  v = measure.versions()
  config = load_config(args)
  hw = workloads.image_hw(config, args.image)
  overrides = "".join(f" {s}" for s in args.set)
  lines = [
      f"### inference: {args.workload} (configs/{WORKLOADS[args.workload][0].config}{overrides}): {hw[0]}x{hw[1]}, "
      f"{workloads.num_pixel_tokens(hw)} pixels, {config.data.max_text_len} tokens, {config.model.dtype}; latency: "
      f"batch 1, {args.latency_iters} calls; retrieval: {args.cache_images} cached images, "
      f"{args.pairs_batch} pairs per batch, {args.pairs_steps} batches; JAX attention: {args.attention}",
      "",
      tables.markdown_table(header, rows),
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
  jax_r = next((r for r in ok if r["framework"] == "jax"), None)
  if jax_r:
    options = ", ".join(f"{k}={v}" for k, v in jax_r["xla_options"].items()) or "none"
    lines.append(
        f"JAX mesh {jax_r['mesh']} for encoding and pair scoring (the config's mesh_shape and cpu_devices), "
        f"compile options: {options}"
    )
  if not measure.on_gpu():
    lines.append(tables.load_line(results))
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m bench.inference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workload", default=None, choices=sorted(WORKLOADS), help="default: r50 on a GPU, demo")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
  p.add_argument("--frameworks", default="jax,torch", help="comma list of " + ",".join(FRAMEWORKS))
  p.add_argument("--image", default=None, help="HxW instead of the config's largest bucket")
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
  p.add_argument("--channels-last", default="on", choices=["on", "off"], help="torch CNN memory format")
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
  gpu = measure.on_gpu()
  args.workload = args.workload or ("r50" if gpu else "demo")
  args.latency_iters = args.latency_iters or (20 if gpu else 10)
  if args.profile:
    args.profile = os.path.abspath(args.profile)  # workers run from the repository root
  try:
    config = load_config(args)  # a bad --set fails here, in one line, before any worker starts
  except (ValueError, FileNotFoundError) as e:
    p.error(str(e))
  if args.attention == "cudnn" and (not gpu or config.model.dtype != "bfloat16"):
    p.error(
        f"--attention cudnn needs a CUDA GPU and model.dtype bfloat16 (here: "
        f"{'a GPU' if gpu else 'no GPU'}, {config.model.dtype})"
    )
  sizes = WORKLOADS[args.workload][1]["gpu" if gpu else "cpu"]
  for k, v in sizes.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.encode_batch = min(args.encode_batch, args.cache_images)
  args.cache_images += -args.cache_images % args.encode_batch  # equal chunks: one compiled encode
  n = 1 if gpu or args.in_process else max(1, int(config.cpu_devices))  # the data axis on a CPU
  for name in ("pairs_batch", "encode_batch"):
    if getattr(args, name) % n:
      p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must divide by the config's {n} CPU devices")
  return args


def run_one(args, framework):
  if framework == "jax":
    return jax_worker(args)
  return torch_worker(args, compile_model=framework == "torch-compile")


def main(argv=None):
  args = parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)
  if args.worker:
    workers.worker_main(args, run_one)
    return
  save = lambda results: workers.write_json(
      args.json,
      dict(mode="inference", workload=args.workload, args=vars(args), versions=measure.versions(), results=results),
  )
  results = workers.run_frameworks(__spec__.name, args, argv, run_one, FRAMEWORKS, save, report)
  if any("error" in r for r in results):
    sys.exit(1)


if __name__ == "__main__":
  main()
