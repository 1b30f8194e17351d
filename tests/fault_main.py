"""`python -m tests.fault_main ARGS...` is `python -m pixelbert_jax.main ARGS...` with a fault at a chosen point.

PIXELBERT_TEST_DISK_FULL=WORKDIR:STEP makes every write-mode open of a file under WORKDIR/checkpoints/ for
step STEP or later raise OSError(ENOSPC), as a full disk does. That is Orbax's Python side of a save: the
JSON items, the metadata and the commit markers, written from its background threads. Tensorstore's array
writes (C++) still land in the step's temporary folder, which the run must clean up.

PIXELBERT_TEST_KILL_IN_EVAL=STEP: kill -9 once the evaluation of step STEP has run and checkpoint STEP is
complete, before the evaluation's metrics are written anywhere (a crash during that evaluation).

PIXELBERT_TEST_SIGTERM_AT=STEP: the process sends itself SIGTERM during step STEP (after its train step,
where the loop asks about preemption), as a preemption notice does; the loop sees it at the next step.

Used by tests/test_faults.py only.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import runpy
import signal
import sys
import time


def _install(spec: str) -> None:
  root, first = spec.rsplit(":", 1)
  checkpoints = os.path.join(os.path.abspath(root), "checkpoints") + os.sep
  real_open = io.open

  def full_disk_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
      path = os.path.abspath(os.fspath(file))
      step = re.match(r"(\d+)", path[len(checkpoints) :]) if path.startswith(checkpoints) else None
      if step and int(step.group(1)) >= int(first):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real_open(file, mode, *args, **kwargs)

  builtins.open = io.open = full_disk_open  # pathlib opens through io.open, epath through builtins.open


def _kill_in_eval(step: int) -> None:
  from pixelbert_jax import metrics_writer  # imports jax, but starts no backend (main.py sets it up)

  real_write = metrics_writer.MetricWriter.write

  def write(self, at, metrics):
    if at == step and any(k.startswith("eval/") for k in metrics):
      checkpoint = self._path.parent / "checkpoints" / str(step)
      while not checkpoint.exists():  # the async save's final rename
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    real_write(self, at, metrics)

  metrics_writer.MetricWriter.write = write


def _sigterm_at(step: int) -> None:
  from pixelbert_jax import checkpoint

  real = checkpoint.Checkpointer.reached_preemption

  def reached_preemption(self, at):
    if at == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(self, at)

  checkpoint.Checkpointer.reached_preemption = reached_preemption


if __name__ == "__main__":
  if os.environ.get("PIXELBERT_TEST_DISK_FULL"):
    _install(os.environ["PIXELBERT_TEST_DISK_FULL"])
  if os.environ.get("PIXELBERT_TEST_KILL_IN_EVAL"):
    _kill_in_eval(int(os.environ["PIXELBERT_TEST_KILL_IN_EVAL"]))
  if os.environ.get("PIXELBERT_TEST_SIGTERM_AT"):
    _sigterm_at(int(os.environ["PIXELBERT_TEST_SIGTERM_AT"]))
  sys.argv[0] = "pixelbert_jax.main"
  runpy.run_module("pixelbert_jax.main", run_name="__main__", alter_sys=True)
