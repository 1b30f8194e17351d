"""Plans a run on a TPU slice from a laptop: compiles the trainer's step for a slice that is not attached.

  python -m pixelbert_jax.aot --config=configs/pretrain.py:r50 --topology=v4-32 [--find_max_batch]

The step is the trainer's own (model_context.StepContext: model, logical sharding rules, mesh, optimizer,
jitted step), built without opening any data, and compiled by libtpu for the slice's topology (deviceless
ahead-of-time compilation, as MaxText's train_compile.py does). It prints, per device, XLA's memory account
against the chip's memory, the FLOPs of one step, whether the config fits, the micro-batches
(`optim.grad_accum_steps`) that would make `batch_size` fit when it does not, and an estimate of images/s
and of the config's wall time at a stated utilisation. Memory is XLA's (measured); time is an estimate of a
machine we do not have: peak FLOP/s x utilisation. Sizes the trainer reads off the data (config -1) come
from --vocab_size / --num_answers. `--screen` stops each compile after XLA's buffer assignment and judges the
fit from it (minutes instead of tens of minutes on a laptop; docs/tpu_planning.md says how far to trust it).
Needs libtpu: `pip install "jax[tpu]==<your jax version>"`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from pixelbert_jax import aot_screen, cli_errors
from pixelbert_jax.tpu_slices import PlanError, parse_slice, quiet_libtpu, usable_hbm

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:r50")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice as its accelerator type: v4-32, v5litepod-64, v5p-8...")
_FIND_MAX = flags.DEFINE_bool("find_max_batch", False, "Search the largest per-device batch that fits")
_START = flags.DEFINE_integer(
    "max_batch_start", 0, "--find_max_batch starts at this per-device batch (0: the config's, to a power of 2)"
)
_UTIL = flags.DEFINE_float(
    "utilization", 0.18, "Assumed model FLOPs utilisation for the time estimate (docs/tpu_planning.md)"
)
_VOCAB = flags.DEFINE_integer("vocab_size", 30522, "Vocabulary size where the config reads it off the data (-1)")
_ANSWERS = flags.DEFINE_integer("num_answers", 3129, "VQA answer count where the config reads it off the data")
_EXAMPLES = flags.DEFINE_integer("train_examples", 0, "Training records per epoch (0: the known size of data.name)")
_JSON = flags.DEFINE_string("json_out", "", "Also write the plan as JSON to this file")
_SCREEN_CAP = flags.DEFINE_integer(
    "screen_cap_mib",
    1024,
    "--screen caps libtpu's HBM at this much, so that XLA refuses every program larger than that right after "
    "its buffer assignment, naming the temporaries it needs, instead of going on to generate code",
)
_MIN_ACCUM = flags.DEFINE_integer(
    "min_accum_steps", 0, "Plan: skip grad_accum_steps below this (known not to fit, e.g. from --find_max_batch)"
)
_SCREEN = flags.DEFINE_bool(
    "screen",
    False,
    "Stop each compile after XLA's buffer assignment (about a minute instead of 10-20 on a laptop) and judge "
    "the fit from its temporaries; misses later limits (on-core VMEM): check the answer without --screen",
)
flags.mark_flags_as_required(["config", "topology"])

USAGE = 2
GIB = aot_screen.GIB


# Training records per epoch of the paper's data, as counted by the trainer (task_table's `record`):
# pre-training counts images, VQA questions, NLVR2 statements, retrieval images.
KNOWN_TRAIN_SIZES = {
    ("pretrain", "coco_karpathy+visual_genome"): 113_287 + 108_077,  # Karpathy train+restval; VG images
    ("vqa", "vqa2"): 443_757,  # VQA v2 train questions
    ("nlvr2", "nlvr2"): 86_373,  # NLVR2 train statements
    ("retrieval", "flickr30k"): 29_000,  # Karpathy train images
    ("retrieval", "coco_karpathy"): 113_287,
}


def _libtpu_or_exit() -> None:
  if importlib.util.find_spec("libtpu") is None:
    version = importlib.metadata.version("jax")
    print(f'error: compiling for a TPU needs libtpu: pip install "jax[tpu]=={version}"', file=sys.stderr)
    sys.exit(USAGE)


@dataclasses.dataclass
class Attempt:
  per_device: int  # examples per device per micro-batch
  accum: int
  fits: bool
  compile_s: float
  memory: dict | None = None  # accumulation.StepMemory as a dict (GiB); when refused, None unless screened
  flops: float = 0.0  # per device per optimizer step
  refusal: str = ""  # the compiler's one-line reason, when refused
  detail: str = ""  # the start of its message (which buffers, which fusion)
  screened: bool = False  # judged from the buffer assignment alone (--screen): memory has no measured code


def compile_once(config, mesh, per_device: int, accum: int, screen_hbm: float | None = None) -> Attempt:
  """Compiles the trainer's step for `per_device` x `accum` examples per device and optimizer step.
  `screen_hbm`: under --screen (libtpu's HBM capped), the chip's usable bytes to judge a refusal against."""
  from pixelbert_jax import accumulation, model_context, partitioning

  dp = partitioning.data_parallel_size(mesh)
  context = model_context.StepContext(config, mesh, steps_per_epoch=1000, accum_steps=accum)
  batch_size = per_device * accum * dp
  t = time.monotonic()
  try:
    lowered = context.lower_step(batch_size, model_context.largest_bucket(config))
    with partitioning.activate(mesh):
      compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - XLA's runtime error
    if not accumulation.out_of_memory(e):
      raise
    text = str(e)
    line = next((s.strip() for s in text.splitlines() if "RESOURCE_EXHAUSTED" in s), "") or cli_errors.first_line(text)
    seconds = time.monotonic() - t
    if screen_hbm is None:
      return Attempt(per_device, accum, False, seconds, refusal=line, detail=text[:4000])
    arguments = aot_screen.state_bytes_per_device(context) + aot_screen.batch_input_bytes(config, mesh, batch_size)
    fits, mem, why = aot_screen.judge(line, arguments, screen_hbm)
    flops = aot_screen.lowered_flops(lowered) / mesh.size * accum  # the scan's body counted once, as below
    return Attempt(per_device, accum, fits, seconds, mem, flops, why, screened=True)
  seconds = time.monotonic() - t
  memory = accumulation.step_memory(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA counts a loop's body once: the micro-batch scan runs it `accum` times (the optimizer update,
  # outside the loop, is a few FLOPs per parameter and is counted k times too: negligible).
  flops = float(cost.get("flops", 0.0)) * accum
  mem = {k: v / GIB for k, v in dataclasses.asdict(memory).items()} | {"total": memory.total / GIB}
  return Attempt(per_device, accum, True, seconds, mem, flops)


def find_max_batch(
    config, mesh, start: int, log, usable: float = 0.0, screen_hbm: float | None = None
) -> tuple[Attempt | None, list[Attempt]]:
  """The largest per-device batch (one micro-batch) that compiles. From above, halving: a program too large
  is refused in seconds, one that fits takes minutes to compile. Then two steps between the largest fit and
  the smallest refusal: where the line through their memory needs meets `usable` when both needs are known
  (screened), else at half the gap."""
  tried, best, refused = [], None, None
  b = max(1, start)
  while b >= 1:
    a = compile_once(config, mesh, b, 1, screen_hbm)
    tried.append(a)
    log(a)
    if a.fits:
      best = a
      break
    refused, b = a, b // 2
  if best is None or refused is None:
    return best, tried
  for _ in range(2):
    lo, hi = best.per_device, refused.per_device
    mid = lo + (hi - lo) // 2
    if usable and best.memory and refused.memory:  # memory grows about linearly with the batch
      per_example = (refused.memory["total"] - best.memory["total"]) / (hi - lo)
      mid = lo + int((usable / GIB - best.memory["total"]) / per_example) if per_example > 0 else mid
      mid = min(max(mid, lo + 1), hi - 1)
    if mid in (lo, hi):
      break
    a = compile_once(config, mesh, mid, 1, screen_hbm)
    tried.append(a)
    log(a)
    best, refused = (a, refused) if a.fits else (best, a)
  return best, tried


def fewest_micro_batches(global_batch: int, dp: int, max_per_device: int) -> int | None:
  """The fewest k such that global_batch splits into k micro-batches of at most `max_per_device` each."""
  from pixelbert_jax import accumulation

  for k in accumulation.candidates(global_batch, dp):
    if global_batch // (dp * k) <= max_per_device:
      return k
  return None


def _fill_sizes(config) -> None:
  if int(config.model.get("vocab_size", 1)) == -1:
    config.model.vocab_size = _VOCAB.value
  if int(config.model.get("num_answers", 1)) == -1:
    config.model.num_answers = _ANSWERS.value


def _describe(a: Attempt) -> str:
  if not a.fits:
    return f"  {a.per_device:>4} per device x {a.accum}: does not fit ({a.compile_s:.0f} s): {a.refusal[:160]}"
  how = "screened" if a.screened else "to compile"
  return f"  {a.per_device:>4} per device x {a.accum}: fits, {a.memory['total']:.2f} GiB ({a.compile_s:.0f} s {how})"


def _search_accumulation(
    config, mesh, hbm: float | None, min_accum: int, screen_hbm: float | None
) -> tuple[Attempt | None, list[Attempt]]:
  """The config as written; when it does not fit (or asks for -1), the fewest micro-batches that do. A k
  whose batch inputs alone exceed the device is not compiled: no micro-batch size can make it fit."""
  from pixelbert_jax import accumulation, partitioning

  dp = partitioning.data_parallel_size(mesh)
  written = int(config.optim.grad_accum_steps)
  tried = []
  for k in accumulation.candidates(config.batch_size, dp):
    if (written != -1 and k < written) or k < min_accum:
      continue
    if tried and hbm and aot_screen.batch_input_bytes(config, mesh, config.batch_size) > hbm:
      print(
          f"  the batch's inputs alone take {aot_screen.batch_input_bytes(config, mesh, config.batch_size) / GIB:.1f} GiB "
          f"per device: no grad_accum_steps fits",
          flush=True,
      )
      break
    a = compile_once(config, mesh, config.batch_size // (dp * k), k, screen_hbm)
    tried.append(a)
    print(_describe(a), flush=True)
    if a.fits:
      return a, tried
  return None, tried


def plan(
    config,
    topology: str,
    *,
    find_max: bool,
    utilization: float,
    train_examples: int,
    max_batch_start: int = 0,
    min_accum: int = 0,
    screen: bool = False,
) -> dict:
  """Compiles the config's step for `topology` and prints the report; returns it as a dict (--json_out).
  `screen`: libtpu's HBM is capped (main does it, before libtpu starts), so fits are judged by aot_screen.judge."""
  from jax.experimental import topologies

  from pixelbert_jax import config_checks, model_context, partitioning

  chip, topo, chips = parse_slice(topology)
  kwargs = {"chip_config_name": chip.chip_config} if chip.chip_config else {}
  devices = topologies.get_topology_desc(topology_name=topo, platform="tpu", **kwargs).devices
  problems = config_checks.device_problems(config, len(devices), 1)
  if problems:
    raise PlanError(problems[0])
  mesh = partitioning.make_mesh(config.mesh_shape, devices)
  dp = partitioning.data_parallel_size(mesh)
  hbm = chip.usable_gib * GIB if screen else usable_hbm(devices)  # screened, libtpu's is the cap
  screen_hbm = hbm if screen else None
  peak = chip.peak_flops * chips / len(devices)
  bucket = model_context.largest_bucket(config)
  print(
      f"{topology}: {topo}, {len(devices)} devices, mesh {dict(mesh.shape)}, "
      f"{(hbm or 0) / GIB:.2f} GiB usable per device, peak {peak / 1e12:.0f} TFLOP/s (bf16) per device"
  )
  print(
      f"config: task {config.task}, batch {config.batch_size} ({config.batch_size // dp} per device), largest "
      f"bucket {bucket[0]}x{bucket[1]}, remat {bool(config.model.get('remat', False))}, "
      f"dtype {config.model.get('dtype', 'float32')}"
  )
  out = dict(
      topology=topology,
      tpu_topology=topo,
      devices=len(devices),
      mesh=dict(mesh.shape),
      usable_hbm_gib=(hbm or 0) / GIB,
      peak_flops_per_device=peak,
      utilization=utilization,
      bucket=bucket,
      batch_size=int(config.batch_size),
      remat=bool(config.model.get("remat", False)),
      screened=screen,
  )
  if find_max:
    start = max(1, max_batch_start or config.batch_size // dp)
    start = start if max_batch_start else 1 << math.ceil(math.log2(start))
    log = lambda a: print(_describe(a), flush=True)  # noqa: E731
    best, tried = find_max_batch(config, mesh, start, log, hbm or 0.0, screen_hbm)
    k = fewest_micro_batches(config.batch_size, dp, best.per_device) if best else None
    out.update(max_per_device=best.per_device if best else 0, accum_for_batch=k)
    print(
        f"largest per-device batch that fits: {out['max_per_device']}; batch {config.batch_size} would need "
        f"optim.grad_accum_steps={k or '(none fits)'} (its inputs add "
        f"{aot_screen.batch_input_bytes(config, mesh, config.batch_size) / GIB:.2f} GiB per device: plan it to check)"
    )
    chosen = best
  else:
    chosen, tried = _search_accumulation(config, mesh, hbm, min_accum, screen_hbm)
    out["fits_as_written"] = bool(tried and tried[0].fits and tried[0].accum == int(config.optim.grad_accum_steps))
  out["tried"] = [dataclasses.asdict(a) for a in tried]
  out["fits"] = chosen is not None
  if chosen is None:
    print(f"verdict: batch {config.batch_size} does NOT fit {topology}")
    return out
  m = chosen.memory
  examples = chosen.per_device * chosen.accum  # per device per step of `chosen`
  step_s = chosen.flops / (utilization * peak) * (config.batch_size / dp) / examples  # at the config's batch
  images_per_s = config.batch_size / step_s
  out.update(
      accum=chosen.accum,
      per_device=chosen.per_device,
      memory_gib=m,
      flops_per_device=chosen.flops,
      flops_per_example=chosen.flops / examples,
      est_step_s=step_s,
      est_images_per_s=images_per_s,
  )
  if chosen.screened:
    print(
        f"memory per device (screened): temporaries {m['temporaries']:.2f} GiB (XLA's buffer assignment), "
        f"arguments {m['arguments']:.2f} GiB (state and batch shards), slack for what a full compile adds "
        f"{m['slack']:.2f} GiB ({aot_screen.SLACK:.0%} of the temporaries and {aot_screen.CODE_GIB} GiB of code); "
        f"total {m['total']:.2f} of {(hbm or 0) / GIB:.2f} GiB. Check it without --screen before renting"
    )
  else:
    print(
        f"memory per device (XLA, measured): arguments {m['arguments']:.2f} GiB, temporaries "
        f"{m['temporaries']:.2f} GiB, outputs {m['outputs']:.2f} GiB ({m['aliased']:.2f} of them in donated "
        f"arguments), code {m['code']:.2f} GiB; total {m['total']:.2f} of {(hbm or 0) / GIB:.2f} GiB"
    )
  print(
      f"FLOPs per device per step (XLA): {chosen.flops:.3g} for {examples} examples "
      f"({chosen.flops / examples / 1e9:.0f} GFLOPs per example, forward and backward)"
  )
  size = train_examples or KNOWN_TRAIN_SIZES.get((config.task, config.data.name), 0)
  if config.get("total_steps", -1) > 0:
    steps, length = int(config.total_steps), f"{int(config.total_steps):,} steps (config.total_steps)"
  elif size:
    steps = int(math.ceil(config.num_epochs * max(1, size // config.batch_size)))
    length = f"{steps:,} steps ({config.num_epochs:g} epochs of {size:,} records)"
  else:
    steps, length = 0, "the wall time needs --train_examples"
  hours = steps * step_s / 3600 if steps else None
  out.update(train_examples=size, steps=steps, est_hours=hours)
  print(
      f"estimate at {utilization:.0%} utilisation: {step_s * 1e3:,.1f} ms per step of {config.batch_size}, "
      f"{images_per_s:,.0f} examples/s; {length}" + (f": {hours:.2f} h" if hours is not None else "")
  )
  if find_max:
    print(f"verdict: at most {chosen.per_device} examples per device per micro-batch on {topology}")
  else:
    how = "as written" if out["fits_as_written"] else f"only with optim.grad_accum_steps={chosen.accum}"
    print(
        f"verdict: batch {config.batch_size} fits {topology} {how}: {chosen.accum} micro-batch(es) of "
        f"{chosen.per_device} per device"
    )
  return out


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
    return USAGE
  _libtpu_or_exit()
  import jax

  # A deviceless executable cannot be stored in or read from the persistent compilation cache.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    parse_slice(_TOPOLOGY.value)
  except PlanError as e:
    print(f"error: {e}", file=sys.stderr)
    return USAGE
  quiet_libtpu(_TOPOLOGY.value)
  if _SCREEN.value:  # before libtpu starts: it reads its flags once
    os.environ["LIBTPU_INIT_ARGS"] = (
        os.environ.get("LIBTPU_INIT_ARGS", "") + f" --xla_tpu_max_hbm_size_mib={_SCREEN_CAP.value}"
    ).strip()
  config = _CONFIG.value
  _fill_sizes(config)
  from pixelbert_jax import config_checks

  # A plan opens no data and restores nothing: the paths the trainer would read are not its business.
  unused = ("config.data.vocab_path=", "config.data.data_dir=", "config.data.manual_dir", "config.init_from")
  found = [p for p in config_checks.problems(config) if not p.startswith(unused)]
  if found:
    print(f"error: {found[0]}", file=sys.stderr)
    return USAGE
  try:
    out = plan(
        config,
        _TOPOLOGY.value,
        find_max=_FIND_MAX.value,
        utilization=_UTIL.value,
        train_examples=_EXAMPLES.value,
        max_batch_start=_START.value,
        min_accum=_MIN_ACCUM.value,
        screen=_SCREEN.value,
    )
  except ValueError as e:  # PlanError, ConfigError, a bad mesh: each one line naming its key
    print(f"error: {cli_errors.first_line(e) or type(e).__name__}", file=sys.stderr)
    return USAGE
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2, default=str)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
