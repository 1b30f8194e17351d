"""What the benchmarks measure and on what: step-time statistics, CPU time and page faults, peak memory,
XLA's FLOP count, device names and library versions."""

import importlib.metadata
import os
import platform
import resource
import statistics


def on_gpu() -> bool:
  """Whether this machine has an NVIDIA GPU, decided without importing jax or torch in the parent
  process (which would otherwise hold GPU memory while the workers run)."""
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


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


def xla_flops(compiled):
  """FLOPs XLA's cost analysis gives for one call of a compiled executable (None if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per executable
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and cost.get("flops") else None


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
