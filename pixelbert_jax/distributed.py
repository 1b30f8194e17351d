"""Multi-host initialisation from the environment, called first thing in main.

`initialize_from_env` decides whether this process joins a multi-process run and hands the rest to
`jax.distributed.initialize`, which has its own cluster detection (SLURM, Open MPI, Cloud TPU on GCE and
GKE, Kubernetes). What is left here is what jax 0.10.2 does not do, or does wrongly for our launches; each
part says why, with the measurement behind it (docs/experiments/2026-12-07-jax-cluster-detection.md).
First match wins:

1. `PIXELBERT_DISTRIBUTED`: `auto` (default), `none` (one process whatever else is set), or `explicit`,
   `slurm`, `jax` to insist on that method and fail if it does not apply. JAX has no switch for its
   detection in the environment.
2. explicit: `PIXELBERT_COORDINATOR_ADDRESS` (host:port of process 0), `PIXELBERT_NUM_PROCESSES`,
   `PIXELBERT_PROCESS_ID`, optionally `PIXELBERT_LOCAL_DEVICE_IDS` ("0,1"); what `launch/` sets. JAX reads
   an address (`JAX_COORDINATOR_ADDRESS`) and device ids from the environment, but no process count or id.
3. a SLURM job step (the variables JAX's own SLURM detection needs): one task is one process; more go to
   JAX's detection with the visible devices corrected.
4. anything else: `jax.distributed.initialize()` with its own detection; when it finds no cluster, one
   process.
"""

from __future__ import annotations

import dataclasses
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
_EXPLICIT_REQUIRED = (ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
_MODES = ("auto", "none", "explicit", "slurm", "jax")
# jax._src.clusters.SlurmCluster.is_env_present: a job step (srun) sets all of them, a batch script not
# SLURM_STEP_NODELIST. Ours is the same test, so that JAX never sees a SLURM step this module let pass.
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# What jax.distributed.initialize() raises when its detection finds no cluster (jax 0.10.2); any other
# error is a cluster it found and failed to join, and stops the run.
_JAX_FOUND_NO_CLUSTER = "coordinator_address should be defined"


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """What `initialize_from_env` will do; built from the environment alone, without touching JAX.

  `local_device_ids`: None leaves JAX's default, () makes every local device visible.
  `required`: for 'jax', fail when JAX finds no cluster instead of running one process.
  """

  method: str  # 'explicit' | 'slurm' | 'jax' | 'single'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  required: bool = False


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
  """Where this process stands after initialisation."""

  detected_by: str  # 'explicit' | 'slurm' | 'jax' | 'single' | 'preinitialized'
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
        f"explicit multi-process setup needs {', '.join(_EXPLICIT_REQUIRED)}; missing: {', '.join(missing)}"
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


def _slurm_plan(environ: Mapping[str, str]) -> InitPlan:
  """JAX finds the coordinator, the count and the id of a SLURM step; two things it gets wrong stay here.

  - One task: JAX still starts a one-process coordinator (on 61440 + job id % 4096) and shows the process
    only GPU SLURM_LOCALID, so `srun -n1 --gpus=8` would train on one GPU. Here it is one plain process.
  - Visible GPUs: JAX shows each process only GPU SLURM_LOCALID. Right for one task per GPU on a node
    that sees all GPUs; wrong with one task per node (our sbatch default: each node would use GPU 0 only)
    and with --gpus-per-task=1 (SLURM already left one GPU, device 0, visible). Those get every device.

  The coordinator host is JAX's: its parser reads 'rack[2-3]-n[07,09]' as 'rack2', and a coordinator it
  cannot reach ends in a C++ abort without the address. launch/gpu_slurm.sbatch avoids both: it asks
  scontrol for the host and sets the explicit variables.
  """
  missing = [name for name in _SLURM_STEP if name not in environ]
  if missing:
    raise ValueError(f"a SLURM job step (srun) sets {', '.join(_SLURM_STEP)}; missing: {', '.join(missing)}")
  count = _int_var(environ, "SLURM_NTASKS", 1)
  _int_var(environ, "SLURM_PROCID", 0)
  if count == 1:
    return InitPlan("single")
  if environ.get(ENV_LOCAL_DEVICE_IDS):
    return InitPlan("slurm", local_device_ids=_device_ids(environ[ENV_LOCAL_DEVICE_IDS], ENV_LOCAL_DEVICE_IDS))
  nodes = next(
      (
          int(environ[n])
          for n in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
          if environ.get(n, "").isdigit()
      ),
      count,
  )
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if count > nodes and len(visible) != 1:
    return InitPlan("slurm", local_device_ids=(_int_var(environ, "SLURM_LOCALID", 0),))
  return InitPlan("slurm", local_device_ids=())


def plan_from_env(environ: Mapping[str, str] | None = None) -> InitPlan:
  """Decides the initialisation method from environment variables."""
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV_MODE, "auto").strip().lower() or "auto"
  if mode not in _MODES:
    raise ValueError(f"{ENV_MODE}={mode!r}: expected one of {', '.join(_MODES)}")
  if mode == "none":
    return InitPlan("single")
  if mode == "explicit" or (mode == "auto" and any(environ.get(n) for n in _EXPLICIT_REQUIRED)):
    return _explicit_plan(environ)
  if mode == "slurm" or (mode == "auto" and all(n in environ for n in _SLURM_STEP)):
    return _slurm_plan(environ)
  return InitPlan("jax", required=mode == "jax")


def wait_for_coordinator(address: str, timeout_s: float, source: str = ENV_ADDRESS) -> float:
  """Polls a TCP connection to the coordinator until it answers; returns the seconds left of `timeout_s`.

  JAX's own wait for an unreachable coordinator ends in a C++ abort (SIGABRT) after its timeout, saying
  "DEADLINE_EXCEEDED" and that "another task died", without the address. Process 0 may start later than
  the others, so refusals are retried until the deadline.
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


def _say(message: str) -> None:
  # stderr, unbuffered: if the runtime aborts in C++ this line is what tells the user what was tried.
  print(f"pixelbert_jax.distributed: {message}", file=sys.stderr, flush=True)


def _check_port_free(address: str) -> None:
  """Process 0 serves the coordinator on [::]:PORT. On a port in use, JAX crashed with SIGSEGV in 12 of
  26 runs (after a C++ log line "Failed to add port to server") and raised "UNKNOWN: Failed to start RPC
  server", naming no port, in the others. Checked here first, so that it is always this one line."""
  _, port = parse_address(address, ENV_ADDRESS)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(("", port))
    except OSError as error:
      raise RuntimeError(
          f"process 0 cannot serve the JAX coordinator on {address}: port {port} is in use on this host "
          f"({error}); pick another port"
      ) from None


def _run_explicit(plan: InitPlan, timeout_s: int) -> None:
  address = plan.coordinator_address
  assert address is not None and plan.num_processes is not None and plan.process_id is not None
  left = float(timeout_s)
  if plan.process_id:
    left = wait_for_coordinator(address, timeout_s)
  else:
    _check_port_free(address)
  _say(f"process {plan.process_id}/{plan.num_processes} joining coordinator {address} (timeout {int(left)} s)")
  try:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=plan.num_processes,
        process_id=plan.process_id,
        local_device_ids=list(plan.local_device_ids) if plan.local_device_ids is not None else None,
        # Off: inside a SLURM step JAX's detection would still fill the device ids from SLURM_LOCALID and
        # show a one-process-per-node task only GPU 0, although every other argument is given.
        cluster_detection_method="deactivate",
        initialization_timeout=max(int(left), 1),
    )
  except Exception as error:
    raise RuntimeError(
        f"joining the JAX coordinator at {address} as process {plan.process_id} of {plan.num_processes} "
        f"failed: {error}"
    ) from error


def _run_jax_detection(plan: InitPlan, timeout_s: int) -> str:
  """JAX's own detection; returns 'single' when it found no cluster and none was required."""
  if plan.method == "slurm":
    _say(
        f"SLURM step: process {os.environ['SLURM_PROCID']}/{os.environ['SLURM_NTASKS']}, coordinator on the "
        f"first host of SLURM_STEP_NODELIST={os.environ['SLURM_STEP_NODELIST']!r}, port JAX_COORDINATOR_PORT or "
        f"61440 + job id % 4096 (timeout {timeout_s} s)"
    )
  try:
    jax.distributed.initialize(
        # [] is "no restriction" to JAX (it restricts only on a non-empty list) and stops it filling them in.
        local_device_ids=list(plan.local_device_ids) if plan.local_device_ids is not None else None,
        cluster_detection_method="slurm" if plan.method == "slurm" else None,
        initialization_timeout=timeout_s,
    )
  except Exception as error:
    no_cluster = isinstance(error, ValueError) and str(error).startswith(_JAX_FOUND_NO_CLUSTER)
    if no_cluster and plan.method == "jax" and not plan.required:
      return "single"
    raise RuntimeError(
        f"jax.distributed.initialize() from the {plan.method} environment failed: {error}. Set "
        f"{ENV_MODE}=none for one process or the PIXELBERT_* variables for an explicit setup."
    ) from error
  return plan.method


def initialize_from_env(timeout_s: int = 300, *, cpu_devices: int = 0) -> DistributedInfo:
  """Joins the multi-process run the environment describes (see the module docstring); idempotent.

  `cpu_devices` > 0 splits the CPU backend into that many devices (config.cpu_devices); 0 keeps JAX's
  default. Call before any other JAX use: backends are created on first use and cannot join afterwards.
  """
  global _INFO
  if _INFO is not None:
    return _INFO
  set_cpu_devices(cpu_devices)
  plan = InitPlan("preinitialized")  # someone called jax.distributed.initialize already: respect it
  detected_by = plan.method
  if not jax.distributed.is_initialized():
    plan = plan_from_env()
    if plan.method == "explicit":
      _run_explicit(plan, timeout_s)
      detected_by = "explicit"
    elif plan.method in ("slurm", "jax"):
      detected_by = _run_jax_detection(plan, timeout_s)
    else:
      detected_by = "single"
  local = tuple(jax.local_devices())
  _INFO = DistributedInfo(
      detected_by=detected_by,
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
