"""One full training step of Pixel-BERT (forward + backward + optimizer update): JAX vs PyTorch, same device.

  python -m bench.train_step --workload demo                   # CPU: the README's demo step, JAX vs eager vs compile
  python -m bench.train_step --workload pretrain-r50 --json out.json     # a GPU: configs/pretrain.py:r50, batch 16
  python -m bench.train_step --workload finetune-r50 --frameworks jax,torch --set model.remat=false
  python -m bench.train_step --workload pretrain-r50 --max-batch         # largest JAX batch that fits (GPU)
  python -m bench.train_step --workload demo --frameworks jax --profile /tmp/prof   # top XLA ops

Run from the repository root. Workloads are the configs the trainer reads (bench/workloads.py):
  pretrain-r50   configs/pretrain.py:r50, batch 16 (1 on a CPU)
  finetune-r50   configs/vqa.py:r50, batch 16 (1 on a CPU)
  pretrain-x152  configs/pretrain.py:x152, batch 16 (1 on a CPU)
  demo           configs/pretrain.py:demo as the README trains it (its batch of 64, its 2 CPU devices)
  demo-finetune  configs/vqa.py:demo with 64 answers: finetune-r50's code path at demo size
`--set KEY=VALUE` overrides any config value (`--set model.dtype=float32`, `--set model.remat=false`);
`--batch` the batch, `--image HxW` the image (default: the config's largest bucket).

The JAX side is the trainer's: `model_context.StepContext` of the config on its mesh (`config.mesh_shape`
over the devices, the CPU split into `config.cpu_devices` as main.py does), with the logical sharding rules
active, its `init_state` and its jitted, donated `train_step`; the batch is placed as the training loop
places it. The PyTorch side is `pixelbert_jax/convert/torch_reference.py`: the same forward in training
mode, the same loss and the optimizer of optim.py (SGD + momentum or AdamW for the CNN, AdamW for the rest,
schedules, clipping), fused on CUDA. Both start from the trainer's initial weights for the config's seed
(converted with convert/model_mapping) and see the same synthetic batch (the task's batch_spec).
`model.dtype=bfloat16` means compute in bfloat16 with float32 parameters on both sides (torch: autocast);
`model.remat` is HF's gradient checkpointing per BERT layer on the torch side; torch also gets channels_last
(--channels-last) and, on CUDA, cudnn.benchmark and TF32 matmuls (XLA's float32 default on GPUs).

Each framework runs in its own subprocess, one after the other. Step times are wall clock per step with a
device sync after every step. "first step" is the first call: JAX lower + compile + run; torch eager: the
first run (cudnn autotuning); torch.compile: Dynamo + Inductor compile + run. Peak memory: JAX
`memory_stats()['peak_bytes_in_use']`, torch `max_memory_allocated` (on CPU: the process's peak RSS).
TFLOP/s divides the FLOPs of one step by the median step time: torch's FlopCounterMode count of one eager
step (matmuls, convolutions, attention; the model's FLOPs) when a torch worker ran, else XLA's
cost_analysis of the compiled JAX step (which includes what remat recomputes). JAX compiles with the
library's options (pixelbert_jax/xla_options.py); `XLA_FLAGS=--xla_multiheap_size_constraint_per_heap=-1`
gives XLA's defaults for an A/B.
"""

import argparse
import gc
import os
import sys
import time

from bench import measure, tables, weights, workers, workloads, xla_profile

FRAMEWORKS = ("jax", "torch", "torch-compile")
# The schedules' epoch length in optimizer steps: it places the learning-rate decay, changes no shape and no
# step time; both frameworks get the same.
STEPS_PER_EPOCH = 1000


def load_config(args):
  return workloads.load(workloads.TRAIN[args.workload], args.set, batch=args.batch, gpu=measure.on_gpu())


# --------------------------------------------------------------------------------------------- JAX
def step_context(args, config):
  """The trainer's StepContext of `config` on the mesh main.py and train.py would build here."""
  from pixelbert_jax import accumulation, distributed, model_context, partitioning

  if not args.in_process:
    distributed.set_cpu_devices(int(config.cpu_devices))  # before the first jax.devices(), as main.py
  mesh = partitioning.make_mesh(config.mesh_shape)
  accum = accumulation.resolve(config, mesh, steps_per_epoch=STEPS_PER_EPOCH)
  return model_context.StepContext(config, mesh, steps_per_epoch=STEPS_PER_EPOCH, accum_steps=accum)


def device_batch(ctx, batch_size, hw):
  from pixelbert_jax import partitioning

  dp = partitioning.data_parallel_size(ctx.mesh)
  if batch_size % dp:
    # An exception, not an exit: a worker reports it in the table's row.
    raise ValueError(f"batch {batch_size} does not split over the mesh's {dp} data-parallel devices")
  return partitioning.global_batch(workloads.synthetic_batch(ctx.config, batch_size, hw), ctx.mesh)


def compile_step(ctx, state, batch):
  from pixelbert_jax import partitioning

  with partitioning.activate(ctx.mesh):
    return ctx.train_step.lower(state, batch).compile()


def jax_worker(args):
  import jax

  config = load_config(args)
  hw = workloads.image_hw(config, args.image)
  t_setup = time.perf_counter()
  ctx = step_context(args, config)
  state = ctx.init_state(config.seed)
  batch = device_batch(ctx, config.batch_size, hw)
  jax.block_until_ready((state, batch))
  setup_s = time.perf_counter() - t_setup
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  weights.save(args.weights, config, state)

  t0 = time.perf_counter()
  compiled = compile_step(ctx, state, batch)
  compile_s = time.perf_counter() - t0
  state, metrics = compiled(state, batch)
  loss0 = float(metrics["loss"][0])  # the only host transfer, outside the timed steps
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  times = []
  usage = measure.cpu_usage()
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  cpu = measure.cpu_stats(usage, measure.cpu_usage(), args.steps)
  mem, mem_kind = measure.jax_peak_memory()
  xla_flops = measure.xla_flops(compiled)  # of one device's program
  if args.profile:
    state, prof = xla_profile.profile_jax(compiled, (state, batch), args.profile)
    xla_profile.print_profile(prof)
  return {
      "framework": "jax",
      "device": measure.jax_device_name(),
      "mesh": dict(ctx.mesh.shape),
      "accum_steps": ctx.accum_steps,
      "params": n_params,
      "batch": config.batch_size,
      "setup_s": setup_s,
      "compile_s": compile_s,
      "first_step_s": first_s,
      "first_loss": loss0,
      "peak_mem_bytes": mem,
      "peak_mem_kind": mem_kind,
      "flops_xla": xla_flops and xla_flops * ctx.mesh.size,
      "xla_options": ctx.compiler_options,
      **cpu,
      **measure.time_stats(times),
  }


def jax_max_batch(args):
  """Largest batch whose train step compiles and runs: doubling from --batch, then bisecting to
  --max-batch-granularity. A fresh state per try (an OOM may have consumed the donated one)."""
  import jax

  config = load_config(args)
  hw = workloads.image_hw(config, args.image)
  ctx = step_context(args, config)
  tried, results = {}, []

  def fits(b):
    if b in tried:
      return tried[b]
    state = batch = None
    t0 = time.perf_counter()
    try:
      state, batch = ctx.init_state(config.seed), device_batch(ctx, b, hw)
      compiled = compile_step(ctx, state, batch)
      state, _ = compiled(state, batch)
      jax.block_until_ready(state)
      t1 = time.perf_counter()
      state, _ = compiled(state, batch)
      jax.block_until_ready(state)
      step_s = time.perf_counter() - t1
      mem, _ = measure.jax_peak_memory()
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
    workers.write_json(
        args.json,
        dict(mode="max-batch", **run_info(args), device=measure.jax_device_name(), tries=results),
    )
    return r["ok"]

  lo, hi = 0, None  # largest known to fit, smallest known not to
  b = config.batch_size
  while hi is None and b <= args.max_batch_limit:
    if fits(b):
      lo, b = b, b * 2
    else:
      hi = b
  if hi is None:
    hi = args.max_batch_limit + 1
  g = args.max_batch_granularity or (8 if measure.on_gpu() else max(1, int(config.cpu_devices)))
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
def torch_worker(args, compile_model):
  import torch

  from pixelbert_jax.convert import torch_reference

  device = measure.torch_device()
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its kernels (XLA autotunes too)
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs: the TF32 matmuls XLA uses by default
    torch.backends.cudnn.allow_tf32 = True
  config = load_config(args)
  hw = workloads.image_hw(config, args.image)
  t_setup = time.perf_counter()
  model = torch_reference.train_mode(weights.torch_model(config, args.weights), config.model).to(device)
  if args.channels_last == "on":
    model.encoder.cnn.to(memory_format=torch.channels_last)
    model.encoder.visual.to(memory_format=torch.channels_last)
  optimizer = torch_reference.Optimizer(model, config, steps_per_epoch=STEPS_PER_EPOCH, fused=device.type == "cuda")
  numpy_batch = workloads.synthetic_batch(config, config.batch_size, hw)
  batch = {k: torch.from_numpy(v).to(device) for k, v in numpy_batch.items()}
  loss_fn = torch_reference.make_loss_fn(model, config, autocast=config.model.dtype == "bfloat16")
  run_loss = torch.compile(loss_fn) if compile_model else loss_fn
  setup_s = time.perf_counter() - t_setup
  n_params = sum(p.numel() for p in model.parameters())

  def step():
    loss, _ = run_loss(batch)
    loss.backward()
    return loss, optimizer.step()

  t0 = time.perf_counter()
  loss, _ = step()
  loss0 = loss.item()
  first_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    step()
  measure.torch_sync(device)
  times = []
  usage = measure.cpu_usage()
  for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    measure.torch_sync(device)
    times.append(time.perf_counter() - t0)
  cpu = measure.cpu_stats(usage, measure.cpu_usage(), args.steps)
  mem, mem_kind = measure.torch_peak_memory(device)

  # FLOPs of one eager step (forward + backward; the optimizer's elementwise work is not counted).
  from torch.utils.flop_counter import FlopCounterMode

  counter = FlopCounterMode(display=False)
  with counter:
    loss_fn(batch)[0].backward()
  model.zero_grad(set_to_none=True)
  return {
      "framework": "torch-compile" if compile_model else "torch",
      "device": measure.torch_device_name(device),
      "params": n_params,
      "batch": config.batch_size,
      "setup_s": setup_s,
      "compile_s": None,
      "first_step_s": first_s,
      "first_loss": loss0,
      "peak_mem_bytes": mem,
      "peak_mem_kind": mem_kind,
      "flops_torch": float(counter.get_total_flops()),
      **cpu,
      **measure.time_stats(times),
  }


# ------------------------------------------------------------------------------------------ report
def describe(args, config) -> str:
  """One line: the config, what the step computes, at what shape."""
  cfg, hw = config.model, workloads.image_hw(config, args.image)
  pixels = workloads.num_pixel_tokens(hw)
  sampled = config.task == "pretrain" and cfg.pixel_sampling.enabled and cfg.pixel_sampling.num_pixels < pixels
  kept = f"{cfg.pixel_sampling.num_pixels} of {pixels}" if sampled else f"all {pixels}"
  cnn = f"cnn norm {cfg.cnn.norm}" + (", frozen" if cfg.cnn.get("frozen", False) else "")
  overrides = "".join(f" {s}" for s in args.set)
  return (
      f"{args.workload} (configs/{workloads.TRAIN[args.workload].config}{overrides}): batch {config.batch_size}, "
      f"{hw[0]}x{hw[1]}, {kept} pixels, {config.data.max_text_len} tokens, {config.task} loss, {cnn}, "
      f"{cfg.dtype}, remat {cfg.remat}"
  )


def report(args, results):
  """The markdown table: one row per framework, FLOPs from torch's counter when a torch worker ran."""
  config = load_config(args)
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
            tables.fmt(tables.gib(r["peak_mem_bytes"]), ".2f"),
            tables.fmt(flops / (r["median_ms"] / 1e3) / 1e12 if flops else None, ".2f"),
            f"{r['first_loss']:.3f}",
        )
    )
  v = measure.versions()
  lines = [
      f"### train step: {describe(args, config)}; {args.steps} timed steps after {args.warmup} warm-up",
      "",
      tables.markdown_table(header, rows),
      "",
      f"versions: jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, "
      f"torch {v['torch']}, transformers {v['transformers']}, python {v['python']}",
      f"FLOPs per step: {tables.fmt(flops and flops / 1e12, '.3f')} TFLOP ({source})",
  ]
  xla = next((r["flops_xla"] for r in ok if r.get("flops_xla")), None)
  if xla and flops != xla:
    lines.append(f"XLA cost_analysis of the JAX step: {xla / 1e12:.3f} TFLOP")
  mems = sorted({r["peak_mem_kind"] for r in ok})
  if mems:
    lines.append("peak memory: " + "; ".join(mems))
  jax_r = next((r for r in ok if r["framework"] == "jax"), None)
  if jax_r:
    options = ", ".join(f"{k}={v}" for k, v in jax_r["xla_options"].items()) or "none"
    lines.append(
        f"JAX mesh {jax_r['mesh']} (the config's mesh_shape and cpu_devices), {jax_r['accum_steps']} "
        f"micro-batch(es) per step, compile options: {options}"
    )
  if not measure.on_gpu():
    lines += [tables.cpu_line(results), tables.load_line(results)]
  return "\n".join(line for line in lines if line is not None)


def run_info(args) -> dict:
  return dict(workload=args.workload, config=workloads.TRAIN[args.workload].config, overrides=list(args.set))


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m bench.train_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workload", default="demo", choices=sorted(workloads.TRAIN))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
  p.add_argument("--frameworks", default="jax,torch,torch-compile", help="comma list of " + ",".join(FRAMEWORKS))
  p.add_argument("--batch", type=int, default=None, help="default: the workload's (bench/workloads.py)")
  p.add_argument("--image", default=None, help="HxW instead of the config's largest bucket")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
  p.add_argument("--channels-last", default="on", choices=["on", "off"], help="torch CNN memory format")
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
  p.add_argument("--max-batch-granularity", type=int, default=None, help="default: 8 on a GPU, cpu_devices on CPU")
  p.add_argument("--weights", default=None, help=argparse.SUPPRESS)  # the initial weights, shared by workers
  p.add_argument("--worker", default=None, choices=FRAMEWORKS, help=argparse.SUPPRESS)
  p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.profile:
    args.profile = os.path.abspath(args.profile)  # workers run from the repository root
  try:
    load_config(args)  # a bad --set or workload fails here, in one line, before any worker starts
  except (ValueError, FileNotFoundError) as e:
    p.error(str(e))
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
  if args.max_batch:
    out = jax_max_batch(args)
    print(
        f"\nmax batch (JAX, {describe(args, load_config(args))}): {out['max_batch']} (first out-of-memory: {out['first_oom']})"
    )
    if out["best"]:
      print(
          f"at batch {out['best']['batch']}: {out['best']['examples_per_s']:.1f} examples/s, "
          f"peak {tables.fmt(tables.gib(out['best']['peak_mem_bytes']), '.1f')} GiB"
      )
    workers.write_json(args.json, dict(mode="max-batch", **run_info(args), versions=measure.versions(), **out))
    return
  save = lambda results: workers.write_json(
      args.json,
      dict(
          mode="train-step",
          **run_info(args),
          describe=describe(args, load_config(args)),
          steps=args.steps,
          warmup=args.warmup,
          versions=measure.versions(),
          results=results,
      ),
  )
  results = workers.run_frameworks(__spec__.name, args, argv, run_one, FRAMEWORKS, save, report)
  devices = {r["device"] for r in results if "device" in r}
  if len(devices) > 1:
    print(f"\nWARNING: the frameworks ran on different devices: {sorted(devices)}")
  if any("error" in r for r in results):
    sys.exit(1)


if __name__ == "__main__":
  main()
