"""Shared by bench/train_step.py and bench/inference.py (not a script): model configs, synthetic batches,
Flax -> PyTorch weights, timing statistics, one subprocess per framework, and the markdown table.

Nothing here imports the data pipeline: on a bare GPU box it pulls grain and tensorflow_datasets, which the
benchmarks do not need (the configs, models, optim, train_step, the tasks' losses and convert.torch_model
import only jax/flax/optax/ml_collections and torch/torchvision/transformers).
"""

import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # runnable from a checkout without `pip install`


def pretrain_config(variant: str = "r50"):
  """configs/pretrain.py's config (pure: loading it opens no data and imports no JAX)."""
  from pixelbert_jax.config_files import load_sibling

  return load_sibling(os.path.join(REPO, "configs", "pretrain.py"), "pretrain").get_config(variant)


def vocab_size(name: str) -> int:
  """`bert`: BERT-base-uncased's vocabulary (the paper configs'); `demo`: the synthetic world's, which
  `pipeline.vocab_size` reads off the vocab file it writes (special tokens + the world's words); counted
  here without opening the data, which would import grain and tensorflow_datasets."""
  if name == "bert":
    from pixelbert_jax.config_files import load_sibling

    return load_sibling(os.path.join(REPO, "configs", "pretrain.py"), "pretrain").BERT_BASE_UNCASED_VOCAB
  if name == "demo":
    from pixelbert_jax.data import synthetic, text

    return len(text.SPECIAL_TOKENS) + len(synthetic.world_words())
  raise ValueError(f"unknown vocabulary {name!r}: bert or demo")


def model_cfg(size, cnn, vocab, *, dtype="float32", remat=False, num_pixels=None, norm=None):
  """The `config.model` of the benchmarked model. num_pixels None: pixel sampling off (all pixels)."""
  from pixelbert_jax.models.presets import model_config

  cfg = model_config(size, cnn, vocab)
  cfg.dtype, cfg.remat = dtype, bool(remat)
  if norm:
    cfg.cnn.norm = norm
  if num_pixels:
    cfg.pixel_sampling.num_pixels = int(num_pixels)
  else:
    cfg.pixel_sampling.enabled = False
  return cfg


def num_pixel_tokens(image_hw):
  """Pixels per image after the CNN (stride 32) and the 2x2 max-pool: 800x1344 -> 12x21 = 252."""
  return (image_hw[0] // 32 // 2) * (image_hw[1] // 32 // 2)


def on_gpu() -> bool:
  """Whether this machine has an NVIDIA GPU, decided without importing jax or torch in the parent
  process (which would otherwise hold GPU memory while the workers run)."""
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def text_batch(rng, batch, text_len, vocab):
  """Token ids away from the special ids [0, 4) and an all-ones text mask."""
  import numpy as np

  return dict(
      input_ids=rng.integers(4, vocab, (batch, text_len), dtype=np.int32),
      text_mask=np.ones((batch, text_len), np.int32),
  )


def image_batch(rng, batch, image_hw):
  import numpy as np

  h, w = image_hw
  return dict(image=rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8), image_mask=np.ones((batch, h, w), bool))


# ------------------------------------------------------------------------------------------ weights
def init_flax(model, task, seed=0):
  """Unboxed float32 variables of `model`, initialised on the host CPU and then put on JAX's default
  device. The JAX worker's set-up took 78 s on an H100 when the init (a whole forward pass) was compiled
  for the GPU; the benchmarks time the train step, not the init."""
  import flax.linen as nn
  import jax
  from pixelbert_jax.models.build import init_variables

  init = jax.jit(lambda k: nn.unbox(init_variables(model, k, task)))
  with jax.default_device(jax.devices("cpu")[0]):
    variables = init(jax.random.key(seed))
  return jax.device_put(variables, jax.devices()[0])


def torch_state_from_flax(cfg, task, variables):
  """Flax variables -> the PyTorch PixelBert state dict (NumPy), by convert/model_mapping.py's rules."""
  import jax
  import numpy as np
  from pixelbert_jax.convert import model_mapping as mm

  variables = jax.device_get(variables)
  rules = mm.model_rules(cfg, task)
  mm.check_export(variables, rules, "bench: Flax -> PyTorch")
  # Copies: some exported tensors are read-only views of JAX's host buffers, and a CPU model trains in place.
  state = {r.torch_name: np.array(mm.export_tensor(variables, r)) for r in rules}
  state.update({n: np.zeros((), np.int64) for n in mm.tracked_names(rules)})
  return state


def save_weights(path, cfg, task, variables):
  """The JAX worker leaves the converted initial weights for the PyTorch workers of the same run, which
  then need not initialise the model in JAX on the CPU (10-20 s for BERT-base + R50)."""
  import numpy as np

  if path and not os.path.exists(path):
    np.savez(path + ".tmp.npz", **torch_state_from_flax(cfg, task, variables))
    os.replace(path + ".tmp.npz", path)


def torch_model(cfg, task, weights_path=None, seed=0):
  """PyTorch PixelBert with the weights of the Flax init `seed`: from `weights_path` when the JAX worker
  left them there, else initialised here (JAX on the CPU) and converted."""
  import numpy as np
  from pixelbert_jax.convert.torch_model import pixelbert_from_state_dict
  from pixelbert_jax.models.build import build_model

  if weights_path and os.path.exists(weights_path):
    with np.load(weights_path) as f:
      state = {k: f[k] for k in f.files}
  else:
    state = torch_state_from_flax(cfg, task, init_flax(build_model(cfg, task), task, seed))
  return pixelbert_from_state_dict(cfg, task, state)


# ------------------------------------------------------------------------------------ measurements
def time_stats(times_s):
  """Seconds per step -> milliseconds: median, p10, p90, min, max (p10/p90 by nearest rank)."""
  ts = sorted(times_s)
  rank = lambda q: ts[min(len(ts) - 1, max(0, round(q * (len(ts) - 1))))]
  return dict(
      median_ms=1e3 * statistics.median(ts),
      p10_ms=1e3 * rank(0.1),
      p90_ms=1e3 * rank(0.9),
      min_ms=1e3 * ts[0],
      max_ms=1e3 * ts[-1],
      n=len(ts),
  )


def cpu_usage():
  """This process's CPU-time and page-fault counters (resource.getrusage), for `cpu_stats`."""
  return resource.getrusage(resource.RUSAGE_SELF)


def cpu_stats(before, after, steps):
  """Per step: user and system CPU milliseconds, minor page faults. On a CPU, system time is mostly the
  kernel zeroing freshly mapped pages: glibc serves allocations above 32 MiB with a new mmap, which is
  what XLA's single temporary buffer was before `--xla-options library` (bench/HISTORY.md item 28)."""
  return dict(
      cpu_user_ms=1e3 * (after.ru_utime - before.ru_utime) / steps,
      cpu_sys_ms=1e3 * (after.ru_stime - before.ru_stime) / steps,
      minflt=(after.ru_minflt - before.ru_minflt) / steps,
  )


def cpu_line(results):
  parts = [
      f"{r['framework']} {r['cpu_user_ms']:.0f} + {r['cpu_sys_ms']:.0f} ms, {r['minflt']:.0f} faults"
      for r in results
      if "cpu_user_ms" in r
  ]
  head = "process CPU per timed step (user + system, minor page faults): "
  return head + ", ".join(parts) if parts else ""


def peak_rss_bytes():
  """Peak resident memory of this process (the CPU stand-in for device memory; each framework runs in
  its own process, so this is that framework's peak, interpreter and libraries included)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def jax_peak_memory():
  import jax

  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return peak_rss_bytes(), "process peak RSS"


def torch_peak_memory(device):
  import torch

  if device.type == "cuda":
    return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
  return peak_rss_bytes(), "process peak RSS"


def add_jax_cpu_devices_arg(parser, what):
  parser.add_argument(
      "--jax-cpu-devices",
      type=int,
      default=None,
      help=f"CPU only: split the CPU into N data-parallel JAX devices for {what}, as "
      "config.cpu_devices (default: 2, the demo configs' value, or 1 on a 1-core "
      "machine; 0 with --in-process)",
  )


def resolve_jax_cpu_devices(args):
  if args.jax_cpu_devices is None:
    args.jax_cpu_devices = 0 if on_gpu() or args.in_process else min(2, os.cpu_count() or 1)


def jax_data_parallel(args):
  """JAX devices the work is split over: --jax-cpu-devices on a CPU, one device on a GPU."""
  return 1 if on_gpu() else max(args.jax_cpu_devices, 1)


def add_xla_options_arg(parser):
  parser.add_argument(
      "--xla-options",
      default="library",
      choices=["library", "none"],
      help="JAX compile options: the library's (pixelbert_jax/xla_options.py: 24 MiB heaps "
      "for CPU temporaries) or none (XLA's default, one temporary buffer per call)",
  )


def jax_compiler_options(args):
  """What `jax.jit(compiler_options=)` gets: the library's, as main.py's steps, unless --xla-options none."""
  from pixelbert_jax import xla_options

  return xla_options.compiler_options() if args.xla_options == "library" else {}


def xla_options_line(args, results):
  """The footer line naming what the JAX worker compiled with (empty when no JAX worker ran)."""
  r = next((r for r in results if r.get("framework") == "jax" and "xla_options" in r), None)
  if r is None:
    return []
  return [
      f"JAX compile options (--xla-options {args.xla_options}): "
      + (", ".join(f"{k}={v}" for k, v in r["xla_options"].items()) or "none")
  ]


def xla_flops(compiled):
  """FLOPs XLA's cost analysis gives for one call of a compiled executable (None if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per executable
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and cost.get("flops") else None


def profile_jax(fn, args, trace_dir, *, steps=3, top=25):
  """Trace `steps` calls of the compiled `fn(*args)` -> fn's result and the `top` XLA ops by time per
  call, each with its output shape and the JAX op it came from (from the compiled HLO's metadata).

  The trace (TensorBoard / Perfetto, `*.trace.json.gz`) stays in trace_dir. Times are summed over
  threads, so on a CPU they can exceed the wall time of the call. On a GPU only kernels that the trace
  ties to an HLO op (args.hlo_op, or named after one) are counted; open the trace for the rest."""
  import collections
  import glob
  import gzip
  import re

  import jax

  hlo = fn.as_text()
  os.makedirs(trace_dir, exist_ok=True)
  jax.block_until_ready(args)  # calls still in flight (async dispatch) would land in the trace
  out = None
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      out = fn(*args)
      args = (out[0],) + tuple(args[1:]) if isinstance(out, tuple) else args  # donated state
      jax.block_until_ready(out)
  traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not traces:
    raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)["traceEvents"]
  # On a GPU the kernels carry their HLO op in args.hlo_op (host-side launch events would count twice);
  # on the CPU the op events are named after the HLO instruction.
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  device = [e for e in complete if e.get("args", {}).get("hlo_op")]
  per_op = collections.Counter()
  for e in device or complete:
    name = e["args"]["hlo_op"] if device else e.get("name", "")
    if name in hlo and not name.startswith(("$", "Thunk", "Pjit")):
      per_op[name] += e["dur"] / 1e3 / steps

  def describe(name):
    m = re.search(r"^\s*(?:ROOT )?%" + re.escape(name) + r" = (\S+) .*$", hlo, re.M)
    if not m:
      return "?", ""
    shape, line = m.group(1), m.group(0)
    op = re.search(r'op_name="([^"]+)"', line)
    called = re.search(r"calls=%([\w.\-]+)", line)
    if not op and called:  # a fusion: the last op named inside its computation
      body = re.search(r"^%" + re.escape(called.group(1)) + r" .*?^\}", hlo, re.M | re.S)
      ops = re.findall(r'op_name="([^"]+)"', body.group(0)) if body else []
      return shape, ops[-1] if ops else ""
    return shape, op.group(1) if op else ""

  rows = [(name, ms, *describe(name)) for name, ms in per_op.most_common(top)]
  return out, dict(trace=traces[-1], total_ms=sum(per_op.values()), top=rows)


def print_profile(prof):
  if not prof["top"]:
    print(f"\nprofile: {prof['trace']}: no event named after an XLA op of the program")
    return
  print(
      f"\nprofile: {prof['trace']}\nXLA ops, ms per call summed over threads " f"(all ops: {prof['total_ms']:.1f} ms):"
  )
  for name, ms, shape, op in prof["top"]:
    print(f"{ms:8.2f}  {name[:34]:34s} {shape[:44]:44s} {op[-90:]}")


def cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
  except OSError:
    pass
  return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def jax_device_name():
  import jax

  d = jax.devices()[0]
  return cpu_name() if d.platform == "cpu" else f"{d.device_kind} ({d.platform})"


def torch_device():
  import torch

  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_device_name(device):
  import torch

  return torch.cuda.get_device_name(device) + " (cuda)" if device.type == "cuda" else cpu_name()


def torch_sync(device):
  import torch

  if device.type == "cuda":
    torch.cuda.synchronize(device)


def versions():
  out = {"python": platform.python_version()}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "transformers"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  return out


# --------------------------------------------------------------------------------- worker processes
_CHILD = None


def _kill_child(signum, frame):
  if _CHILD is not None and _CHILD.poll() is None:
    os.killpg(_CHILD.pid, signal.SIGKILL)
    _CHILD.wait()
  raise SystemExit(128 + signum)


def run_worker(script, framework, argv, timeout_s):
  """Runs `script argv --worker framework` in a fresh process and returns its result dict.

  One process per framework: JAX and PyTorch never share an allocator or a GPU, each process's peak
  memory is its own, and a crash or hang in one leaves the others' results. The worker gets its own
  process group (torch.compile starts compile workers), killed on timeout and when this process is
  terminated (e.g. by `timeout` in gpu_run.sh).
  """
  global _CHILD
  fd, path = tempfile.mkstemp(suffix=".json", prefix=f"bench_{framework}_")
  os.close(fd)
  env = dict(os.environ)
  if framework != "jax":
    # The PyTorch worker uses JAX only to initialise the weights it converts: keep JAX on the CPU so that
    # it takes no GPU memory (XLA would preallocate most of it) in the PyTorch process.
    env["JAX_PLATFORMS"] = "cpu"
  cold_dir = None
  if framework == "torch-compile" and "TORCHINDUCTOR_CACHE_DIR" not in env:
    # A fresh Inductor cache, so that "first step" is a cold compile, as JAX's (no persistent cache).
    cold_dir = tempfile.mkdtemp(prefix="bench_inductor_")
    env["TORCHINDUCTOR_CACHE_DIR"] = cold_dir
  # OpenMP's wait policy is left to the caller (bench/HISTORY.md): on a CPU shared with other jobs, the
  # default spin-waiting made PyTorch's demo forward take 600 ms instead of 8 ms (OMP_WAIT_POLICY=PASSIVE
  # fixes that), but on an idle machine PASSIVE costs PyTorch 30% of its train step and 3x its latency.
  cmd = [sys.executable, os.path.abspath(script), *argv, "--worker", framework, "--worker-json", path]
  print(f"\n=== {framework}: {' '.join(cmd[1:])}", flush=True)
  load = os.getloadavg()[0]
  _CHILD = subprocess.Popen(cmd, env=env, start_new_session=True)
  try:
    try:
      rc = _CHILD.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(_CHILD.pid, signal.SIGKILL)
      _CHILD.wait()
      return dict(framework=framework, error=f"timed out after {timeout_s} s")
    with open(path) as f:
      text = f.read()
  finally:
    _CHILD = None
    os.remove(path)
    if cold_dir:
      shutil.rmtree(cold_dir, ignore_errors=True)
  if not text:
    return dict(framework=framework, error=f"worker exited with status {rc}")
  # 1-minute load average before and after: on a shared CPU, how much else was running.
  return dict(json.loads(text), load_avg=(load, os.getloadavg()[0]))


def run_frameworks(script, args, argv, run_one, frameworks_known, save, report):
  """Each framework of --frameworks in turn (a subprocess each, unless --in-process); `save(results)`
  after each. Terminated midway (SIGTERM from `timeout`), it still saves and prints what finished.
  The workers share one weights file (the JAX worker writes it, see save_weights), removed at the end."""
  frameworks = args.frameworks.split(",")
  weights_dir = tempfile.mkdtemp(prefix="bench_weights_")
  if not args.in_process and not args.weights:
    argv = [*argv, "--weights", os.path.join(weights_dir, "weights.npz")]
  try:
    return _run_frameworks(script, args, argv, run_one, frameworks_known, save, report, frameworks)
  finally:
    shutil.rmtree(weights_dir, ignore_errors=True)


def _run_frameworks(script, args, argv, run_one, frameworks_known, save, report, frameworks):
  bad = [f for f in frameworks if f not in frameworks_known]
  if bad:
    raise SystemExit(f"unknown framework(s) {bad}; expected some of {frameworks_known}")
  signal.signal(signal.SIGTERM, _kill_child)
  results = []
  try:
    for fw in frameworks:
      results.append(run_one(args, fw) if args.in_process else run_worker(script, fw, argv, args.worker_timeout))
      save(results)
  except SystemExit:
    results += [dict(framework=f, error="stopped: terminated (time limit)") for f in frameworks[len(results) :]]
    save(results)
    print("\n" + report(args, results), flush=True)
    raise
  print("\n" + report(args, results), flush=True)
  return results


def worker_main(args, run_one):
  """In a worker process: run one framework and write its result, or the error that stopped it (an
  out-of-memory, say) so that the table shows why."""
  try:
    result = run_one(args, args.worker)
  except Exception as e:  # noqa: BLE001 - reported in the table, then the traceback
    lines = str(e).strip().splitlines() or [""]
    write_json(args.worker_json, dict(framework=args.worker, error=f"{type(e).__name__}: {lines[0][:160]}"))
    raise
  write_json(args.worker_json, result)


def write_json(path, obj):
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)  # a run killed mid-write keeps the previous complete file


def markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def fmt(x, spec=".1f", missing="-"):
  return missing if x is None else format(x, spec)


def gib(n):
  return None if n is None else n / 2**30


def load_line(results):
  """'1-min load average before/after each worker' (only meaningful on a shared CPU)."""
  parts = [f"{r['framework']} {r['load_avg'][0]:.1f}/{r['load_avg'][1]:.1f}" for r in results if "load_avg" in r]
  return ("1-min load average before/after each framework: " + ", ".join(parts)) if parts else ""
