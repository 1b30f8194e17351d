"""What a checkpoint folder holds and what makes one of its steps good, for the writer (checkpoint.py) and the
readers (checkpoint_variables.py) alike.

A checkpoint folder (WORKDIR/checkpoints) holds one folder per saved step, named by the step; each holds five
items, so that each reader takes only what it needs:
  `params` — {'params', 'batch_stats'}: the model (what fine-tuning and PyTorch export read),
  `train`  — {'step', 'opt_state', 'rng'}: the rest of the train state,
  `data`   — the input pipeline's iterator state (JSON), so a resumed run sees exactly the next batch,
  `meta`   — task, model config and vocabulary size (JSON), so a checkpoint describes itself,
  `log`    — the metric sums of the steps since the last logged one (JSON), so that a resumed run's next
             `metrics.jsonl` row averages the same steps as an uninterrupted run's (absent before it existed).
A step is good when it can be read, its parameters fit the model the config builds and they are finite. A
save that was killed or ran out of disk leaves a `STEP.orbax-checkpoint-tmp*` folder, which is never read.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from pixelbert_jax import cli_errors

ITEMS = ("params", "train", "data", "meta", "log")
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step (or item) folder that was never finalised


def handlers() -> dict[str, ocp.CheckpointHandler]:
  """Every item's handler. Registered up front so that a fresh process can read item metadata before any
  save or restore."""
  return {
      "params": ocp.StandardCheckpointHandler(),
      "train": ocp.StandardCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
      "log": ocp.JsonCheckpointHandler(),
  }


class CheckpointMismatchError(ValueError):
  """The checkpoint's parameters do not fit the model the config builds."""


class UnreadableCheckpointError(FileNotFoundError):
  """No step of the checkpoint can be read (or the one asked for cannot); the message names it."""


class CheckpointSaveError(OSError):
  """A save that ran out of disk (its ENOSPC error is the cause): `step_dir` is the step folder it was
  writing, `free_bytes` the free space when the failure was seen, before the unfinished folder was removed
  (None where unknown, e.g. gs://)."""

  def __init__(self, step: int, step_dir: epath.Path, free_bytes: int | None, cause: BaseException):
    super().__init__(
        errno.ENOSPC, f"Saving checkpoint step {step} failed: {cli_errors.first_line(cause, with_type=True)}"
    )
    self.step, self.step_dir, self.free_bytes = step, step_dir, free_bytes


def out_of_memory(e: BaseException) -> bool:
  """An allocation failure: it says nothing about the files being read."""
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)


def is_step_dir(path: epath.Path) -> bool:
  return path.name.isdigit() and (path / "params").is_dir()


def steps(directory: epath.Path) -> list[int]:
  """The saved steps in a checkpoint folder, ascending."""
  return sorted(int(p.name) for p in directory.iterdir() if is_step_dir(p))


def resolve_checkpoint_dir(path: str | epath.Path) -> tuple[epath.Path, int]:
  """Accepts a workdir, its `checkpoints/` folder, or one step folder; returns (manager dir, step)."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint path {path} does not exist")
  if not path.is_dir():
    raise FileNotFoundError(
        f"Checkpoint path {path} is a file; expected a workdir, its checkpoints/ folder " "or a step folder"
    )
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if is_step_dir(path):
    return path.parent, int(path.name)
  found = steps(path)
  if not found:
    raise FileNotFoundError(
        f"{path} holds no checkpoint (expected a workdir, its checkpoints/ folder, "
        "or a step folder with a params/ item)"
    )
  return path, found[-1]


def remove_tmp_dirs(directory: epath.Path, *, settle_s: float = 1.0, timeout_s: float = 60.0) -> list[str]:
  """Deletes the unfinished `*.orbax-checkpoint-tmp*` step folders in `directory` (a save that was killed or
  ran out of disk): they are never read, and a full disk stays full while they are there. Returns their names.

  After a failed async save, Orbax stops waiting at the first item that failed while the other items' array
  writes are still in flight, and those writes recreate folders under the tmp folder. So a folder counts as
  removed only once it has stayed absent for `settle_s`; one still there after `timeout_s` is logged as an
  error that names it."""
  if not directory.is_dir():
    return []
  found = [p for p in sorted(directory.iterdir()) if TMP_MARKER in p.name]
  if not found:
    return []
  logging.warning("Removing unfinished checkpoint folders in %s: %s", directory, ", ".join(p.name for p in found))
  pending, deadline = found, time.monotonic() + timeout_s
  while pending:
    for p in pending:
      shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    time.sleep(settle_s)
    pending = [p for p in pending if p.exists()]
    if pending and time.monotonic() > deadline:
      logging.error("Could not remove unfinished checkpoint folders (delete them by hand): %s", pending)
      break
  return [p.name for p in found if p not in pending]


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point arrays of `tree` that hold NaN or Inf, [] if none do. One reduction on
  the devices where the arrays live (cheap enough before every save); only a failure fetches per-array
  flags, which are replicated and so readable on every host."""
  if bool(_all_finite(tree)):
    return []
  flags = jax.device_get(jax.jit(lambda t: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), t))(tree))
  return [
      jax.tree_util.keystr(path, simple=True, separator="/")
      for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]
      if not bool(ok)
  ]


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {}
  return {k: tuple(getattr(v, "shape", np.shape(v))) for k, v in flat.items()}


def compare_shapes(
    expected: Any, found: Any, *, what: str, allow_missing: bool = False, allow_extra: bool = False
) -> None:
  """Raises CheckpointMismatchError naming every parameter whose presence or shape differs."""
  exp, got = _flat_shapes(expected), _flat_shapes(found)
  problems = [
      f"{k}: config expects {exp[k]}, checkpoint has {got[k]}"
      for k in sorted(exp.keys() & got.keys())
      if exp[k] != got[k]
  ]
  if not allow_missing:
    problems += [f"{k}: missing from the checkpoint" for k in sorted(exp.keys() - got.keys())]
  if not allow_extra:
    problems += [f"{k}: in the checkpoint but not in the model" for k in sorted(got.keys() - exp.keys())]
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointMismatchError(f"{what} does not match the model built from the config:\n  {shown}{more}")
