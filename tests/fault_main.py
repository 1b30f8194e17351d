"""`python -m tests.fault_main ARGS...` is `python -m pixelbert_jax.main ARGS...` on a disk that fills up.

PIXELBERT_TEST_DISK_FULL=WORKDIR:STEP makes every write-mode open of a file under WORKDIR/checkpoints/ for
step STEP or later raise OSError(ENOSPC), as a full disk does. That is Orbax's Python side of a save: the
JSON items, the metadata and the commit markers, written from its background threads. Tensorstore's array
writes (C++) still land in the step's temporary folder, which the run must clean up. Used by
tests/test_faults.py only.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import runpy
import sys


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


if __name__ == "__main__":
  if os.environ.get("PIXELBERT_TEST_DISK_FULL"):
    _install(os.environ["PIXELBERT_TEST_DISK_FULL"])
  sys.argv[0] = "pixelbert_jax.main"
  runpy.run_module("pixelbert_jax.main", run_name="__main__", alter_sys=True)
