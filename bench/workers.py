"""One process per framework: each worker is this package's module run again with `--worker FRAMEWORK`, its
result a JSON file; the parent collects them, saving and printing what finished even when stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `python -m bench.NAME` resolves


_CHILD = None


def _kill_child(signum, frame):
  if _CHILD is not None and _CHILD.poll() is None:
    os.killpg(_CHILD.pid, signal.SIGKILL)
    _CHILD.wait()
  raise SystemExit(128 + signum)


def run_worker(module, framework, argv, timeout_s):
  """Runs `python -m module argv --worker framework` in a fresh process, from the folder that holds this
  package (path arguments must be absolute), and returns its result dict.

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
    # A PyTorch worker uses JAX only to initialise the weights it converts (when no JAX worker left them):
    # keep JAX on the CPU so that it takes no GPU memory (XLA would preallocate most of it) in that process.
    env["JAX_PLATFORMS"] = "cpu"
  cold_dir = None
  if framework == "torch-compile" and "TORCHINDUCTOR_CACHE_DIR" not in env:
    # A fresh Inductor cache, so that "first step" is a cold compile, as JAX's (no persistent cache).
    cold_dir = tempfile.mkdtemp(prefix="bench_inductor_")
    env["TORCHINDUCTOR_CACHE_DIR"] = cold_dir
  # OpenMP's wait policy is left to the caller (bench/HISTORY.md): on a CPU shared with other jobs, the
  # default spin-waiting made PyTorch's demo forward take 600 ms instead of 8 ms (OMP_WAIT_POLICY=PASSIVE
  # fixes that), but on an idle machine PASSIVE costs PyTorch 30% of its train step and 3x its latency.
  cmd = [sys.executable, "-m", module, *argv, "--worker", framework, "--worker-json", path]
  print(f"\n=== {framework}: {' '.join(cmd[1:])}", flush=True)
  load = os.getloadavg()[0]
  _CHILD = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
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


def run_frameworks(module, args, argv, run_one, frameworks_known, save, report):
  """Each framework of --frameworks in turn (a subprocess each, unless --in-process); `save(results)`
  after each. Terminated midway (SIGTERM from `timeout`), it still saves and prints what finished.
  The workers share one weights file (the JAX worker writes it, bench/weights.py), removed at the end."""
  frameworks = args.frameworks.split(",")
  weights_dir = tempfile.mkdtemp(prefix="bench_weights_")
  if not args.weights:
    args.weights = os.path.join(weights_dir, "weights.npz")
    argv = [*argv, "--weights", args.weights]
  try:
    return _run_frameworks(module, args, argv, run_one, frameworks_known, save, report, frameworks)
  finally:
    shutil.rmtree(weights_dir, ignore_errors=True)


def _run_frameworks(module, args, argv, run_one, frameworks_known, save, report, frameworks):
  bad = [f for f in frameworks if f not in frameworks_known]
  if bad:
    raise SystemExit(f"unknown framework(s) {bad}; expected some of {frameworks_known}")
  signal.signal(signal.SIGTERM, _kill_child)
  results = []
  try:
    for fw in frameworks:
      results.append(run_one(args, fw) if args.in_process else run_worker(module, fw, argv, args.worker_timeout))
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
