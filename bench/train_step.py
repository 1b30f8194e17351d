"""One full training step of Pixel-BERT (forward + backward + optimizer update): JAX vs PyTorch, same device.

  python bench/train_step.py --workload demo                  # CPU: demo model, a few minutes on 2 cores
  python bench/train_step.py --workload pretrain-r50 --batch 16 --dtype bfloat16 --json out.json  # a GPU
  python bench/train_step.py --workload finetune-r50 --frameworks jax,torch
  python bench/train_step.py --workload pretrain-r50 --max-batch   # largest JAX batch that fits (GPU)
  python bench/train_step.py --workload demo --frameworks jax --profile /tmp/prof  # top XLA ops

Workloads (all with 40 text tokens):
  pretrain-r50   BERT-base + ResNet-50, 800x1344 images (252 pixels), 100 sampled pixels, MLM + ITM loss
  finetune-r50   the same model with the VQA head (3129 answers) and all 252 pixels (fine-tuning never
                 samples), VQA loss (BCE over the answers, as tasks/vqa.py)
  pretrain-x152  BERT-base + ResNeXt-152 32x4d, 600x1024 images (144 pixels), 100 sampled pixels
  demo           the demo model (configs/pretrain.py:demo): 192x192 images, 6 of 9 pixels, batch 32
  demo-finetune  the demo model with the VQA head and all pixels (finetune-r50's code path, CPU-sized)

What one step is, on both sides: the model in training mode (dropout 0.1 in BERT), pixel sampling as the
workload says, the pre-training loss of tasks/pretrain.py (or the VQA loss), gradients of all
parameters, the global gradient norm (the trainer logs it), and the paper's optimizers: SGD + momentum
with coupled weight decay for the CNN, AdamW for the rest, no decay on biases and norms (optim.py; torch:
torch.optim.SGD + AdamW, fused on CUDA). Batch norm is the config's: `frozen_bn` (r50/x152, the paper's
recipe) uses the running statistics and a constant affine on both sides (torch: BatchNorm2d in eval mode,
affine requires_grad=False); `bn` (demo) uses batch statistics and updates the running averages on both
sides. The JAX train state is donated. bfloat16 means compute in bfloat16 with float32 parameters on
both sides (JAX: model.dtype=bfloat16; torch: autocast(bfloat16)); torch also gets channels_last and
cudnn.benchmark. Both start from the same weights (the Flax init converted with convert/model_mapping)
and see the same batch.

On a CPU, JAX splits the batch over 2 data-parallel CPU devices (--jax-cpu-devices; the demo configs'
cpu_devices), because XLA's CPU backend runs most ops of a step on one thread; torch uses its intra-op
threads. JAX compiles with the library's CPU compile options (pixelbert_jax/xla_options.py, as main.py's
steps; --xla-options none for XLA's defaults). Each framework runs in its own subprocess, one after the
other. Step times are wall clock per step with a device sync after every step. "first step" is the
first call: JAX lower + compile + run; torch eager: the first run (cudnn autotuning); torch.compile:
Dynamo + Inductor compile + run. Peak memory: JAX `memory_stats()['peak_bytes_in_use']`, torch
`max_memory_allocated` (on CPU: the process's peak RSS).
TFLOP/s divides the FLOPs of one step by the median step time: torch's FlopCounterMode count of one eager
step (matmuls, convolutions, attention; the model's FLOPs) when a torch worker ran, else XLA's
cost_analysis of the compiled JAX step (which includes what remat recomputes).
"""

import argparse
import functools
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (bench/common.py; puts the repo root on sys.path)

WORKLOADS = {
    # size, cnn, task, image (h, w), text_len, sampled pixels (None: all), vocab, norm override, cpu batch
    "pretrain-r50": dict(
        size="base",
        cnn="r50",
        task="pretrain",
        image=(800, 1344),
        text_len=40,
        num_pixels=100,
        vocab="bert",
        norm=None,
        cpu_batch=1,
    ),
    "finetune-r50": dict(
        size="base",
        cnn="r50",
        task="vqa",
        image=(800, 1344),
        text_len=40,
        num_pixels=None,
        vocab="bert",
        norm=None,
        cpu_batch=1,
    ),
    "pretrain-x152": dict(
        size="base",
        cnn="x152",
        task="pretrain",
        image=(600, 1024),
        text_len=40,
        num_pixels=100,
        vocab="bert",
        norm=None,
        cpu_batch=1,
    ),
    # configs/pretrain.py:demo: batch norm with batch statistics, gradient clipping at 1.0.
    "demo": dict(
        size="demo",
        cnn="demo",
        task="pretrain",
        image=(192, 192),
        text_len=40,
        num_pixels=6,
        vocab="demo",
        norm="bn",
        cpu_batch=32,
        grad_clip_norm=1.0,
    ),
    # The finetune-r50 code path (VQA head, all pixels) at demo size: for CPU rehearsals of gpu_run.sh.
    "demo-finetune": dict(
        size="demo",
        cnn="demo",
        task="vqa",
        image=(192, 192),
        text_len=40,
        num_pixels=None,
        vocab="demo",
        norm="bn",
        cpu_batch=32,
    ),
}
FRAMEWORKS = ("jax", "torch", "torch-compile")


def workload_cfg(args):
  w = dict(WORKLOADS[args.workload])
  w["vocab"] = common.vocab_size(w["vocab"])  # "bert" or "demo" -> the size
  if args.image:  # e.g. the r50 model at a CPU-sized image, to check the code path
    w["image"] = tuple(int(v) for v in args.image.split("x"))
  cfg = common.model_cfg(
      w["size"],
      w["cnn"],
      w["vocab"],
      dtype=args.dtype,
      remat=args.remat == "on",
      num_pixels=w["num_pixels"],
      norm=args.norm or w["norm"],
  )
  if args.cnn_impl:
    cfg.cnn.impl = args.cnn_impl
  return w, cfg


def optim_config(w):
  """configs/pretrain.py's optimizer (the paper's), with the workload's gradient clipping."""
  import ml_collections

  optim = common.pretrain_config().optim
  optim.grad_clip_norm = w.get("grad_clip_norm", 0.0)
  return ml_collections.ConfigDict(dict(optim=optim.to_dict(), model=dict(cnn=dict(frozen=False))))


def synthetic_batch(w, cfg, batch, seed=0):
  """The same batch (NumPy, seed 0) in every worker: images, captions, 15% MLM targets, ITM labels."""
  import numpy as np

  rng = np.random.default_rng(seed)
  b = dict(
      **common.image_batch(rng, batch, w["image"]),
      **common.text_batch(rng, batch, w["text_len"], w["vocab"]),
      example_mask=np.ones((batch,), np.int32),
  )
  if w["task"] == "pretrain":
    b["mlm_labels"] = rng.integers(4, w["vocab"], (batch, w["text_len"]), dtype=np.int32)
    b["mlm_weights"] = (rng.random((batch, w["text_len"])) < 0.15).astype(np.float32)
    b["itm_label"] = rng.integers(0, 2, (batch,), dtype=np.int32)
  else:  # VQA soft scores: a few answers per question at 0.3 .. 1
    t = np.zeros((batch, cfg.num_answers), np.float32)
    for i in range(batch):
      t[i, rng.integers(0, cfg.num_answers, 3)] = rng.choice([0.3, 0.6, 0.9, 1.0], 3)
    b["vqa_targets"] = t
  return b


# --------------------------------------------------------------------------------------------- JAX
def jax_setup(args, batch_size):
  """-> (jitted donated train step, init_state(seed) -> state, device batch, model cfg)."""
  import jax
  import jax.numpy as jnp

  from pixelbert_jax import distributed, optim, tasks, train_step
  from pixelbert_jax.models.build import build_model

  distributed.set_cpu_devices(args.jax_cpu_devices)  # before the first jax.devices()
  w, cfg = workload_cfg(args)
  model = build_model(cfg, w["task"])
  abstract = jax.eval_shape(lambda: common.init_flax(model, w["task"]))
  tx, _ = optim.make_optimizer(optim_config(w), abstract["params"], steps_per_epoch=1000)
  update_bn = cfg.cnn.norm == "bn"

  def init_state(seed=0):
    variables = common.init_flax(model, w["task"], seed)
    params = variables["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": jax.jit(tx.init)(params),
        "rng": jax.random.key(seed + 1),
    }

  # The library's step (pixelbert_jax/train_step.py), as train.Trainer jits it, with the task's own loss.
  step_fn = functools.partial(
      train_step.train_step, model=model, task=tasks.get_task(w["task"]), tx=tx, update_batch_stats=update_bn
  )

  batch, n = synthetic_batch(w, cfg, batch_size), common.jax_data_parallel(args)
  if n > 1:
    # As main.py with config.cpu_devices: the batch split over a data axis, the state replicated.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(jax.devices()[:n], ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = {k: NamedSharding(mesh, P("data")) for k in batch}
    step = jax.jit(
        step_fn,
        in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
        donate_argnums=0,
        compiler_options=common.jax_compiler_options(args),
    )
    return step, lambda seed=0: jax.device_put(init_state(seed), replicated), jax.device_put(batch, batch_sharding), cfg
  step = jax.jit(step_fn, donate_argnums=0, compiler_options=common.jax_compiler_options(args))
  return step, init_state, jax.device_put(batch), cfg


def jax_worker(args):
  import jax

  t_setup = time.perf_counter()
  step, init_state, batch, cfg = jax_setup(args, args.batch)
  state = init_state()
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - t_setup
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  common.save_weights(
      args.weights,
      cfg,
      WORKLOADS[args.workload]["task"],
      {"params": state["params"], "batch_stats": state["batch_stats"]},
  )

  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch)
  loss0 = float(metrics["loss"][0])  # the only host transfer, outside the timed steps
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  usage = common.cpu_usage()
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  cpu = common.cpu_stats(usage, common.cpu_usage(), args.steps)
  mem, mem_kind = common.jax_peak_memory()
  xla_flops = common.xla_flops(compiled)  # of one device's program
  xla_flops = xla_flops and xla_flops * common.jax_data_parallel(args)
  if args.profile:
    state, prof = common.profile_jax(compiled, (state, batch), args.profile)
    common.print_profile(prof)
  return dict(
      framework="jax",
      device=common.jax_device_name(),
      params=n_params,
      batch=args.batch,
      setup_s=setup_s,
      compile_s=compile_s,
      first_step_s=first_s,
      first_loss=loss0,
      peak_mem_bytes=mem,
      peak_mem_kind=mem_kind,
      flops_xla=xla_flops,
      xla_options=common.jax_compiler_options(args),
      **cpu,
      **common.time_stats(times),
  )


def jax_max_batch(args):
  """Largest batch whose train step compiles and runs: doubling from --batch, then bisecting to
  --max-batch-granularity. A fresh state per try (an OOM may have consumed the donated one)."""
  import jax

  tried, results = {}, []

  def fits(b):
    if b in tried:
      return tried[b]
    state = batch = None
    t0 = time.perf_counter()
    try:
      step, init_state, batch, _ = jax_setup(args, b)
      state = init_state()
      compiled = step.lower(state, batch).compile()
      state, _ = compiled(state, batch)
      jax.block_until_ready(state)
      t1 = time.perf_counter()
      state, _ = compiled(state, batch)
      jax.block_until_ready(state)
      step_s = time.perf_counter() - t1
      mem, _ = common.jax_peak_memory()
      r = dict(batch=b, ok=True, step_ms=1e3 * step_s, examples_per_s=b / step_s, peak_mem_bytes=mem)
    except Exception as e:  # noqa: BLE001 - only out-of-memory counts as "does not fit"
      msg = str(e)
      if not any(k in msg.lower() for k in ("resource_exhausted", "resource exhausted", "out of memory")):
        raise
      r = dict(batch=b, ok=False, error=msg.splitlines()[0][:200])
    finally:
      del state, batch
      gc.collect()
    r["seconds"] = time.perf_counter() - t0
    print(
        f"max-batch: batch {b}: {'fits' if r['ok'] else 'out of memory'} ({r['seconds']:.0f} s)"
        + (f", {r['examples_per_s']:.1f} examples/s" if r["ok"] else ""),
        flush=True,
    )
    tried[b] = r["ok"]
    results.append(r)
    common.write_json(
        args.json,
        dict(
            mode="max-batch",
            workload=args.workload,
            dtype=args.dtype,
            remat=args.remat,
            device=common.jax_device_name(),
            versions=common.versions(),
            tries=results,
        ),
    )
    return r["ok"]

  lo, hi = 0, None  # largest known to fit, smallest known not to
  b = args.batch
  while hi is None and b <= args.max_batch_limit:
    if fits(b):
      lo, b = b, b * 2
    else:
      hi = b
  if hi is None:
    hi = args.max_batch_limit + 1
  g = args.max_batch_granularity
  while hi - lo > g:
    mid = lo + max(g, (hi - lo) // 2 // g * g)  # batches stay multiples of g above lo
    if mid >= hi:
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
  best = max((r for r in results if r["ok"]), key=lambda r: r["batch"], default=None)
  return dict(max_batch=lo, first_oom=hi if hi <= args.max_batch_limit else None, best=best, tries=results)


# ------------------------------------------------------------------------------------------- torch
def torch_sample_pixels(pixels, pixel_mask, k):
  """models/pixel_bert.py sample_pixels: k distinct valid pixels per image, uniformly, in grid order."""
  import torch

  if k >= pixel_mask.shape[1]:
    return pixels, pixel_mask
  scores = torch.rand(pixel_mask.shape, device=pixels.device).masked_fill(~pixel_mask, float("-inf"))
  idx = torch.topk(scores, k, dim=1).indices.sort(dim=1).values
  return (torch.gather(pixels, 1, idx[..., None].expand(-1, -1, pixels.shape[-1])), torch.gather(pixel_mask, 1, idx))


def torch_loss_fn(model, w, cfg, use_autocast, device):
  """batch -> (loss, metrics): the same computation as the JAX step's loss (tasks/pretrain.py or the VQA loss)."""
  import torch
  from torch.nn import functional as F

  def loss_fn(batch):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
      ex = batch["example_mask"].float()
      if w["task"] == "pretrain":
        enc = model.encoder
        pixels, pixel_mask = enc.encode_image(batch["image"], batch["image_mask"])
        if cfg.pixel_sampling.enabled:
          pixels, pixel_mask = torch_sample_pixels(pixels, pixel_mask, cfg.pixel_sampling.num_pixels)
        seq, pooled = enc.fuse(batch["input_ids"], batch["text_mask"], pixels, pixel_mask)
        mlm = model.mlm_head(seq[:, : batch["input_ids"].shape[1]], enc.bert.embeddings.word_embeddings.weight)
        itm = model.itm_head(pooled)
      else:
        logits = model(batch["image"], batch["image_mask"], batch["input_ids"], batch["text_mask"])["vqa_logits"]
    if w["task"] == "pretrain":
      mlm_w = batch["mlm_weights"] * ex[:, None]
      xent = F.cross_entropy(mlm.float().flatten(0, 1), batch["mlm_labels"].long().flatten(), reduction="none").view_as(
          mlm_w
      )
      mlm_loss = (xent * mlm_w).sum() / mlm_w.sum().clamp_min(1e-9)
      itm_xent = F.cross_entropy(itm.float(), batch["itm_label"].long(), reduction="none")
      itm_loss = (itm_xent * ex).sum() / ex.sum().clamp_min(1e-9)
      # The accuracies loss_and_metrics also returns (cheap; returned so that a compiler keeps them).
      mlm_acc = ((mlm.argmax(-1) == batch["mlm_labels"]).float() * mlm_w).sum()
      itm_acc = ((itm.argmax(-1) == batch["itm_label"]).float() * ex).sum()
      return mlm_loss + itm_loss, (mlm_acc, itm_acc)
    bce = F.binary_cross_entropy_with_logits(logits.float(), batch["vqa_targets"], reduction="none").sum(-1)
    return (bce * ex).sum() / ex.sum().clamp_min(1.0), ()

  return loss_fn


def torch_optimizers(model, device):
  """optim.py's recipe: SGD + momentum (coupled decay) on the CNN, AdamW elsewhere; decay on matrices and
  conv kernels only."""
  import torch

  o = common.pretrain_config().optim
  groups = {("cnn", True): [], ("cnn", False): [], ("tf", True): [], ("tf", False): []}
  for name, p in model.named_parameters():
    if p.requires_grad:
      groups[("cnn" if name.startswith("encoder.cnn.") else "tf", p.ndim >= 2)].append(p)
  fused = {"fused": True} if device.type == "cuda" else {}
  sgd = torch.optim.SGD(
      [
          {"params": groups[("cnn", True)], "weight_decay": o["cnn"]["weight_decay"]},
          {"params": groups[("cnn", False)], "weight_decay": 0.0},
      ],
      lr=o["cnn"]["lr"],
      momentum=o["cnn"]["momentum"],
      **fused,
  )
  t = o["transformer"]
  adamw = torch.optim.AdamW(
      [
          {"params": groups[("tf", True)], "weight_decay": t["weight_decay"]},
          {"params": groups[("tf", False)], "weight_decay": 0.0},
      ],
      lr=t["lr"],
      betas=(t["b1"], t["b2"]),
      eps=t["eps"],
      **fused,
  )
  params = [p for g in groups.values() for p in g]
  return [sgd, adamw], params


def torch_setup(args, w, cfg, device):
  import torch
  from pixelbert_jax.convert.torch_model import PixelBert

  torch.manual_seed(0)
  if args.torch_init == "flax":
    model = common.torch_model(cfg, w["task"], args.weights)
  else:
    model = PixelBert(cfg, w["task"])
  model.to(device)
  if args.channels_last == "on":
    model.encoder.cnn.to(memory_format=torch.channels_last)
    model.encoder.visual.to(memory_format=torch.channels_last)
  model.train()
  if cfg.cnn.norm == "frozen_bn":  # as the Flax Norm: running statistics, constant affine
    for m in model.encoder.cnn.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.eval()
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
  if cfg.remat:  # Flax: nn.remat per BertLayer; HF: checkpoint per BertLayer
    model.encoder.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  return model


def torch_worker(args, compile_model):
  import torch

  device = common.torch_device()
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels (XLA autotunes too)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs: the TF32 matmuls XLA uses by default
    torch.backends.cudnn.allow_tf32 = True
  w, cfg = workload_cfg(args)
  t_setup = time.perf_counter()
  model = torch_setup(args, w, cfg, device)
  clip = w.get("grad_clip_norm", 0.0)
  opts, params = torch_optimizers(model, device)
  batch = {k: torch.from_numpy(v).to(device) for k, v in synthetic_batch(w, cfg, args.batch).items()}
  if "image_mask" in batch:
    batch["image_mask"] = batch["image_mask"].bool()
  loss_fn = torch_loss_fn(model, w, cfg, args.dtype == "bfloat16", device)
  run_loss = torch.compile(loss_fn) if compile_model else loss_fn
  setup_s = time.perf_counter() - t_setup
  n_params = sum(p.numel() for p in model.parameters())

  def step():
    loss, _ = run_loss(batch)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    if clip:
      gnorm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    else:  # the trainer logs the global norm; computed on both sides
      gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    for o in opts:
      o.step()
    for o in opts:
      o.zero_grad(set_to_none=True)
    return loss, gnorm

  t0 = time.perf_counter()
  loss, _ = step()
  loss0 = loss.item()
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    step()
  common.torch_sync(device)
  times = []
  usage = common.cpu_usage()
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    common.torch_sync(device)
    times.append(time.perf_counter() - t0)
  cpu = common.cpu_stats(usage, common.cpu_usage(), args.steps)
  mem, mem_kind = common.torch_peak_memory(device)

  # FLOPs of one eager step (forward + backward; the optimizer's elementwise work is not counted).
  from torch.utils.flop_counter import FlopCounterMode

  counter = FlopCounterMode(display=False)
  with counter:
    loss_fn(batch)[0].backward()
  for o in opts:
    o.zero_grad(set_to_none=True)
  name = "torch-compile" if compile_model else "torch"
  return dict(
      framework=name,
      device=common.torch_device_name(device),
      params=n_params,
      batch=args.batch,
      setup_s=setup_s,
      compile_s=None,
      first_step_s=first_s,
      first_loss=loss0,
      peak_mem_bytes=mem,
      peak_mem_kind=mem_kind,
      flops_torch=float(counter.get_total_flops()),
      **cpu,
      **common.time_stats(times),
  )


# ------------------------------------------------------------------------------------------ report
def report(args, results):
  """The markdown table: one row per framework, FLOPs from torch's counter when a torch worker ran."""
  ok = [r for r in results if "error" not in r]
  flops = next((r["flops_torch"] for r in ok if r.get("flops_torch")), None)
  source = "torch FlopCounterMode (one eager step, fwd+bwd)"
  if flops is None:
    flops = next((r["flops_xla"] for r in ok if r.get("flops_xla")), None)
    source = "XLA cost_analysis of the JAX step"
  header = (
      "framework",
      "device",
      "batch",
      "examples/s",
      "step ms median",
      "p10-p90 ms",
      "min-max ms",
      "first step s",
      "peak mem GiB",
      "TFLOP/s",
      "loss step 1",
  )
  rows = []
  for r in results:
    if "error" in r:
      rows.append((r["framework"], "-", "-", f"**{r['error']}**", *["-"] * 7))
      continue
    rows.append(
        (
            r["framework"],
            r["device"],
            r["batch"],
            f"{r['batch'] / (r['median_ms'] / 1e3):.2f}",
            f"{r['median_ms']:.1f}",
            f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}",
            f"{r['min_ms']:.1f}-{r['max_ms']:.1f}",
            f"{r['first_step_s']:.1f}",
            common.fmt(common.gib(r["peak_mem_bytes"]), ".2f"),
            common.fmt(flops / (r["median_ms"] / 1e3) / 1e12 if flops else None, ".2f"),
            f"{r['first_loss']:.3f}",
        )
    )
  v = common.versions()
  w, cfg = workload_cfg(args)
  pixels = common.num_pixel_tokens(w["image"])
  sampled = cfg.pixel_sampling.enabled and cfg.pixel_sampling.num_pixels < pixels
  kept = f"{cfg.pixel_sampling.num_pixels} of {pixels}" if sampled else f"all {pixels}"
  lines = [
      f"### train step: {args.workload} ({w['image'][0]}x{w['image'][1]}, {kept} pixels, "
      f"{w['text_len']} tokens, {w['task']} loss, cnn norm {cfg.cnn.norm}), {args.dtype}, remat {args.remat}, "
      f"{args.steps} timed steps after {args.warmup} warm-up",
      "",
      common.markdown_table(header, rows),
      "",
      f"versions: jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, "
      f"torch {v['torch']}, transformers {v['transformers']}, python {v['python']}",
      f"FLOPs per step: {common.fmt(flops and flops / 1e12, '.3f')} TFLOP ({source})",
  ]
  xla = next((r["flops_xla"] for r in ok if r.get("flops_xla")), None)
  if xla and flops != xla:
    lines.append(f"XLA cost_analysis of the JAX step: {xla / 1e12:.3f} TFLOP")
  mems = sorted({r["peak_mem_kind"] for r in ok})
  if mems:
    lines.append("peak memory: " + "; ".join(mems))
  lines += common.xla_options_line(args, ok)
  if not common.on_gpu():
    if any(r["framework"] == "jax" for r in ok):
      lines.append(f"JAX CPU devices (data-parallel, --jax-cpu-devices): {common.jax_data_parallel(args)}")
    lines += [common.cpu_line(results), common.load_line(results)]
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", default="demo", choices=sorted(WORKLOADS))
  p.add_argument("--frameworks", default="jax,torch,torch-compile", help="comma list of " + ",".join(FRAMEWORKS))
  p.add_argument("--batch", type=int, default=None, help="default: 16 on a GPU, the workload's CPU batch")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bfloat16 on a GPU")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
  p.add_argument("--remat", default="off", choices=["on", "off"], help="rematerialise each BERT layer")
  p.add_argument("--image", default=None, help="HxW instead of the workload's image size")
  p.add_argument("--norm", default=None, choices=["frozen_bn", "bn", "gn"], help="override the CNN norm")
  p.add_argument(
      "--cnn-impl",
      default=None,
      choices=["auto", "generic", "cpu"],
      help="JAX model.cnn.impl (default: the config's, auto = cpu on a CPU, generic elsewhere)",
  )
  common.add_jax_cpu_devices_arg(p, "the step")
  common.add_xla_options_arg(p)
  p.add_argument("--channels-last", default="on", choices=["on", "off"], help="torch CNN memory format")
  p.add_argument(
      "--torch-init",
      default="flax",
      choices=["flax", "random"],
      help="flax: the Flax init converted (same weights); random: torch's own init (faster)",
  )
  p.add_argument("--json", default=None, help="write the results here (rewritten after each framework)")
  p.add_argument(
      "--profile",
      default=None,
      metavar="DIR",
      help="after timing, trace 3 JAX steps into DIR and print the top XLA ops",
  )
  p.add_argument("--worker-timeout", type=float, default=1800, help="seconds per framework subprocess")
  p.add_argument("--in-process", action="store_true", help="run the frameworks in this process (tests)")
  p.add_argument("--max-batch", action="store_true", help="find the largest JAX batch that fits")
  p.add_argument("--max-batch-limit", type=int, default=1024)
  p.add_argument("--max-batch-granularity", type=int, default=None, help="default: 8 on a GPU, 1 on CPU")
  p.add_argument("--weights", default=None, help=argparse.SUPPRESS)  # the initial weights, shared by workers
  p.add_argument("--worker", default=None, choices=FRAMEWORKS, help=argparse.SUPPRESS)
  p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  gpu = common.on_gpu()
  if args.batch is None:
    args.batch = 16 if gpu else WORKLOADS[args.workload]["cpu_batch"]
  if args.dtype is None:
    args.dtype = "bfloat16" if gpu else "float32"
  common.resolve_jax_cpu_devices(args)
  if args.max_batch_granularity is None:
    args.max_batch_granularity = 8 if gpu else common.jax_data_parallel(args)
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
  if args.max_batch:
    out = jax_max_batch(args)
    print(
        f"\nmax batch (JAX, {args.workload}, {args.dtype}, remat {args.remat}): {out['max_batch']}"
        f" (first out-of-memory: {out['first_oom']})"
    )
    if out["best"]:
      print(
          f"at batch {out['best']['batch']}: {out['best']['examples_per_s']:.1f} examples/s, "
          f"peak {common.fmt(common.gib(out['best']['peak_mem_bytes']), '.1f')} GiB"
      )
    common.write_json(
        args.json,
        dict(
            mode="max-batch",
            workload=args.workload,
            dtype=args.dtype,
            remat=args.remat,
            versions=common.versions(),
            **out,
        ),
    )
    return
  save = lambda results: common.write_json(
      args.json,
      dict(
          mode="train-step",
          workload=args.workload,
          dtype=args.dtype,
          remat=args.remat,
          batch=args.batch,
          steps=args.steps,
          warmup=args.warmup,
          versions=common.versions(),
          results=results,
      ),
  )
  results = common.run_frameworks(__file__, args, argv, run_one, FRAMEWORKS, save, report)
  devices = {r["device"] for r in results if "device" in r}
  if len(devices) > 1:
    print(f"\nWARNING: the frameworks ran on different devices: {sorted(devices)}")
  if any("error" in r for r in results):
    sys.exit(1)


if __name__ == "__main__":
  main()
