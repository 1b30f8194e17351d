"""Multi-host initialisation from the environment, called first thing in main.

One entry point, `initialize_from_env`, decides how this process joins a multi-process JAX run and does it
through `jax.distributed.initialize`. Detection, first match wins:

1. `PIXELBERT_DISTRIBUTED=none` forces a single process (other values: `auto`, the default, or one of
   `explicit`, `slurm`, `tpu` to insist on that method and fail if its variables are missing).
2. explicit: `PIXELBERT_COORDINATOR_ADDRESS` (host:port of process 0), `PIXELBERT_NUM_PROCESSES`,
   `PIXELBERT_PROCESS_ID`, optionally `PIXELBERT_LOCAL_DEVICE_IDS` ("0,1"). The launch scripts set these.
3. SLURM: a job step with more than one task (`SLURM_STEP_NUM_TASKS` or `SLURM_NTASKS`, plus
   `SLURM_PROCID`). The coordinator is the first node of the step's node list; the port is
   `PIXELBERT_COORDINATOR_PORT` or derived from the job id the way jax does.
4. TPU VM: TPU chips on the PCI bus or the TPU worker variables; jax finds the rest from the metadata server
   (`jax.distributed.initialize()` with no arguments).
5. otherwise a single process: no initialize call.

A process that cannot reach the coordinator raises within `timeout_s` naming the address, instead of
blocking in gRPC: jax's own failure there is a C++ abort that does not say which address it tried.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import socket
import sys
import time
from collections.abc import Mapping

import jax

ENV_MODE = "PIXELBERT_DISTRIBUTED"
ENV_ADDRESS = "PIXELBERT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "PIXELBERT_NUM_PROCESSES"
ENV_PROCESS_ID = "PIXELBERT_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "PIXELBERT_LOCAL_DEVICE_IDS"
ENV_PORT = "PIXELBERT_COORDINATOR_PORT"
_EXPLICIT_REQUIRED = (ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
_MODES = ("auto", "none", "explicit", "slurm", "tpu")
_TPU_ENV_MARKERS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU v3 .. v7 chips (same table as jax._src.hardware_utils, kept here to stay off private API).
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """What `initialize_from_env` will do; built from the environment alone, without touching JAX."""

  method: str  # 'explicit' | 'slurm' | 'tpu' | 'single'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  """Where this process stands after initialisation."""

  detected_by: str  # 'explicit' | 'slurm' | 'tpu' | 'single' | 'preinitialized'
  process_index: int
  process_count: int
  local_devices: tuple
  device_count: int
  platform: str
  coordinator_address: str | None

  @property
  def local_device_count(self) -> int:
    return len(self.local_devices)

  @property
  def is_main_process(self) -> bool:
    return self.process_index == 0


_INFO: DistributedInfo | None = None


def _int_var(environ: Mapping[str, str], name: str, minimum: int) -> int:
  raw = environ[name]
  try:
    value = int(raw.strip())
  except ValueError:
    raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
  if value < minimum:
    raise ValueError(f"environment variable {name}={raw!r} must be >= {minimum}")
  return value


def parse_address(address: str, source: str) -> tuple[str, int]:
  """'host:port' or '[v6]:port' -> (host, port); `source` names where it came from for the error."""
  match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9_.-]+):(\d+)", address.strip())
  if not match:
    raise ValueError(f"{source}={address!r} is not HOST:PORT")
  host = match.group(1) or match.group(3)
  port = int(match.group(2) or match.group(4))
  if not 0 < port < 65536:
    raise ValueError(f"{source}={address!r}: port {port} is outside 1..65535")
  return host, port


def _device_ids(raw: str, source: str) -> tuple[int, ...]:
  parts = [p.strip() for p in raw.split(",") if p.strip()]
  if not parts or not all(p.isdigit() for p in parts):
    raise ValueError(f"{source}={raw!r} is not a comma-separated list of device ids like '0,1'")
  return tuple(int(p) for p in parts)


def _explicit_plan(environ: Mapping[str, str]) -> InitPlan:
  missing = [name for name in _EXPLICIT_REQUIRED if not environ.get(name)]
  if missing:
    raise ValueError(
        f"explicit multi-process setup needs {', '.join(_EXPLICIT_REQUIRED)}; " f"missing: {', '.join(missing)}"
    )
  address = environ[ENV_ADDRESS].strip()
  parse_address(address, ENV_ADDRESS)
  num_processes = _int_var(environ, ENV_NUM_PROCESSES, 1)
  process_id = _int_var(environ, ENV_PROCESS_ID, 0)
  if process_id >= num_processes:
    raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be < {ENV_NUM_PROCESSES}={num_processes}")
  local = environ.get(ENV_LOCAL_DEVICE_IDS)
  return InitPlan(
      "explicit", address, num_processes, process_id, _device_ids(local, ENV_LOCAL_DEVICE_IDS) if local else None
  )


def first_slurm_host(nodelist: str) -> str:
  """First host of a SLURM hostlist: 'gpu[003-010,12],cpu1' -> 'gpu003', 'r[1-2]-n[07-08]' -> 'r1-n07'."""
  out, i = [], 0
  while i < len(nodelist) and nodelist[i] != ",":
    if nodelist[i] == "[":
      end = nodelist.find("]", i)
      if end < 0:
        raise ValueError(f"SLURM node list {nodelist!r} has an unclosed '['")
      out.append(re.split(r"[,-]", nodelist[i + 1 : end])[0])
      i = end + 1
    else:
      out.append(nodelist[i])
      i += 1
  host = "".join(out).strip()
  if not host:
    raise ValueError(f"SLURM node list {nodelist!r} names no host")
  return host


def _slurm_task_count(environ: Mapping[str, str]) -> int | None:
  for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
    if environ.get(name):
      return _int_var(environ, name, 1)
  return None


def _slurm_plan(environ: Mapping[str, str]) -> InitPlan:
  count = _slurm_task_count(environ)
  nodelist_var = next(
      (n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(n)), None
  )
  missing = [
      n
      for n, ok in (
          ("SLURM_NTASKS", count),
          ("SLURM_PROCID", environ.get("SLURM_PROCID")),
          ("SLURM_JOB_ID", environ.get("SLURM_JOB_ID")),
          ("SLURM_JOB_NODELIST", nodelist_var),
      )
      if not ok
  ]
  if missing:
    raise ValueError(f"SLURM multi-process setup is missing {', '.join(missing)}")
  process_id = _int_var(environ, "SLURM_PROCID", 0)
  if process_id >= count:
    raise ValueError(f"SLURM_PROCID={process_id} must be < the task count {count}")
  if environ.get(ENV_PORT):
    port = _int_var(environ, ENV_PORT, 1)
  else:  # jax's choice, so that a job mixing both agrees: one port per job in the top 4096.
    port = _int_var(environ, "SLURM_JOB_ID", 0) % 4096 + 65535 - 4095
  address = f"{first_slurm_host(environ[nodelist_var])}:{port}"
  parse_address(address, f"coordinator from {nodelist_var}")
  local = None
  if environ.get(ENV_LOCAL_DEVICE_IDS):
    local = _device_ids(environ[ENV_LOCAL_DEVICE_IDS], ENV_LOCAL_DEVICE_IDS)
  else:
    nodes = next(
        (
            int(environ[n])
            for n in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
            if environ.get(n, "").isdigit()
        ),
        count,
    )
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    # Several tasks per node means one GPU each; when SLURM already bound one GPU per task
    # (--gpus-per-task) the process sees it as device 0 and needs no restriction.
    if count > nodes and environ.get("SLURM_LOCALID", "").isdigit() and len(visible) != 1:
      local = (int(environ["SLURM_LOCALID"]),)
  return InitPlan("slurm", address, count, process_id, local)


def _tpu_chips_on_pci(sys_root: str) -> int:
  chips = 0
  for vendor_path in glob.glob(os.path.join(sys_root, "bus/pci/devices/*/vendor")):
    device_path = os.path.join(os.path.dirname(vendor_path), "device")
    try:
      with open(vendor_path) as v, open(device_path) as d:
        if v.read().strip() == _GOOGLE_PCI_VENDOR and d.read().strip() in _TPU_PCI_DEVICES:
          chips += 1
    except OSError:
      continue
  return chips


def _is_tpu_vm(environ: Mapping[str, str], sys_root: str) -> bool:
  return any(environ.get(n) for n in _TPU_ENV_MARKERS) or _tpu_chips_on_pci(sys_root) > 0


def _single_tpu_host(environ: Mapping[str, str]) -> bool:
  hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES")
  return bool(hosts) and "," not in hosts and not environ.get("MEGASCALE_COORDINATOR_ADDRESS")


def plan_from_env(environ: Mapping[str, str] | None = None, *, sys_root: str = "/sys") -> InitPlan:
  """Decides the initialisation method from environment variables (and the PCI bus for TPUs)."""
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV_MODE, "auto").strip().lower() or "auto"
  if mode not in _MODES:
    raise ValueError(f"{ENV_MODE}={mode!r}: expected one of {', '.join(_MODES)}")
  if mode == "none":
    return InitPlan("single")
  if mode == "explicit" or (mode == "auto" and any(environ.get(n) for n in _EXPLICIT_REQUIRED)):
    return _explicit_plan(environ)
  if mode == "slurm" or (mode == "auto" and (_slurm_task_count(environ) or 0) > 1):
    return _slurm_plan(environ)
  if mode == "tpu" or (mode == "auto" and _is_tpu_vm(environ, sys_root) and not _single_tpu_host(environ)):
    return InitPlan("tpu")
  return InitPlan("single")


def wait_for_coordinator(address: str, timeout_s: float, source: str = ENV_ADDRESS) -> float:
  """Polls a TCP connection to the coordinator until it answers; returns the seconds left of `timeout_s`.

  Process 0 may start later than the others, so refusals are retried until the deadline.
  """
  host, port = parse_address(address, source)
  deadline = time.monotonic() + timeout_s
  last_error: Exception | None = None
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      break
    try:
      with socket.create_connection((host, port), timeout=min(2.0, max(left, 0.1))):
        return max(deadline - time.monotonic(), 0.0)
    except OSError as error:  # refused, unreachable, unresolvable: the coordinator may still come up
      last_error = error
    time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
  raise RuntimeError(
      f"cannot reach the JAX coordinator at {address} (from {source}) within {timeout_s:g} s: {last_error}. "
      "Check that process 0 is running, that the host name resolves from this machine and that the port "
      "is open between the nodes."
  )


def _check_port_free(address: str) -> None:
  """Process 0 binds the coordinator on all interfaces: a busy port would otherwise be a C++ abort."""
  _, port = parse_address(address, ENV_ADDRESS)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(("", port))
    except OSError as error:
      raise RuntimeError(
          f"process 0 cannot serve the JAX coordinator on {address}: port {port} is "
          f"in use on this host ({error}); pick another port"
      ) from None


def _ensure_cpu_collectives() -> None:
  """Cross-process computations on CPU need a collectives library; gloo is jax 0.10's default, set it
  when a jax leaves it unset so the two-process CPU run (tests, laptops) works on every version."""
  try:
    if not jax.config.jax_cpu_collectives_implementation:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # a jax without the option decides by itself
    pass


def _say(message: str) -> None:
  # stderr, unbuffered: if the runtime aborts in C++ this line is what tells the user what was tried.
  print(f"pixelbert_jax.distributed: {message}", file=sys.stderr, flush=True)


def _run_plan(plan: InitPlan, timeout_s: int) -> None:
  if plan.method == "single":
    return
  _ensure_cpu_collectives()
  if plan.method == "tpu":
    _say(f"TPU VM detected; jax.distributed.initialize() from the TPU metadata (timeout {timeout_s} s)")
    try:
      jax.distributed.initialize(initialization_timeout=timeout_s)
    except Exception as error:
      raise RuntimeError(
          f"TPU multi-host initialisation failed: {error}. Set {ENV_MODE}=none for a "
          "single-host run or the PIXELBERT_* variables for an explicit one."
      ) from error
    return
  address = plan.coordinator_address
  assert address is not None and plan.num_processes is not None and plan.process_id is not None
  left = float(timeout_s)
  if plan.process_id == 0:
    _check_port_free(address)
  else:
    left = wait_for_coordinator(address, timeout_s, source=f"{plan.method} coordinator address")
  _say(
      f"process {plan.process_id}/{plan.num_processes} joining coordinator {address} "
      f"({plan.method}, timeout {int(left)} s)"
  )
  try:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=plan.num_processes,
        process_id=plan.process_id,
        local_device_ids=list(plan.local_device_ids) if plan.local_device_ids is not None else None,
        cluster_detection_method="deactivate",
        initialization_timeout=max(int(left), 1),
    )
  except Exception as error:
    raise RuntimeError(
        f"joining the JAX coordinator at {address} as process {plan.process_id} of "
        f"{plan.num_processes} failed: {error}"
    ) from error


def initialize_from_env(
    timeout_s: int = 300, *, cpu_devices: int = 0, environ: Mapping[str, str] | None = None, sys_root: str = "/sys"
) -> DistributedInfo:
  """Joins the multi-process run the environment describes (see the module docstring); idempotent.

  `cpu_devices` > 0 splits the CPU backend into that many devices (config.cpu_devices); 0 keeps JAX's
  default. Call before any other JAX use: backends are created on first use and cannot join afterwards.
  """
  global _INFO
  if _INFO is not None:
    return _INFO
  set_cpu_devices(cpu_devices)
  if jax.distributed.is_initialized():
    plan = InitPlan("preinitialized")  # someone called jax.distributed.initialize already: respect it
  else:
    plan = plan_from_env(environ, sys_root=sys_root)
    _run_plan(plan, timeout_s)
  local = tuple(jax.local_devices())
  _INFO = DistributedInfo(
      detected_by=plan.method,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      local_devices=local,
      device_count=jax.device_count(),
      platform=local[0].platform,
      coordinator_address=plan.coordinator_address,
  )
  _say(
      f"{_INFO.detected_by}: process {_INFO.process_index} of {_INFO.process_count}, "
      f"{_INFO.local_device_count} local / {_INFO.device_count} global {_INFO.platform} devices"
  )
  return _INFO


def set_cpu_devices(n: int) -> None:
  """How many devices the CPU backend exposes (`jax_num_cpu_devices`); 0 leaves JAX's default (one, or
  --xla_force_host_platform_device_count). XLA's CPU backend runs most ops of a step on one thread, so a
  CPU-only run uses N cores through N-way data parallelism (bench/HISTORY.md, item 21). GPU and TPU
  backends are unaffected: their meshes never include CPU devices."""
  if not isinstance(n, int) or isinstance(n, bool) or n < 0:
    raise ValueError(f"config.cpu_devices must be an integer >= 0 (0: JAX's default), got {n!r}")
  if n == 0 or jax.config.jax_num_cpu_devices == n:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as error:  # the backend exists already: too late to split it
    raise RuntimeError(
        f"config.cpu_devices={n} must be applied before JAX creates its backends, which "
        f"this process has already done: {error}"
    ) from error


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, TensorBoard and config files."""
  return jax.process_index() == 0
