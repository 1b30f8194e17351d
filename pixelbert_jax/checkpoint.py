"""Orbax checkpoints of a training run: save every `checkpoint_every_steps`, resume from the newest good step.

The items of a step and what makes a step good: checkpoint_files.py. Reading the model alone (predict,
evaluate, convert, init_from) and merging it into a fresh model: checkpoint_variables.py. This module's names
include theirs, so that callers import `checkpoint` alone.

Only finite parameters are saved (train.py checks before each save). A step that cannot be read, or whose
parameters are not finite (written before that check existed), is skipped: training moves it aside to
`STEP.corrupt-<time>` so that a rerun retrains that step; the read-only readers use the newest good step and
log which. A save that runs out of disk is raised as CheckpointSaveError, naming the step folder and the free
space, at the next step (`Checkpointer.check`) rather than at the end of the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from pixelbert_jax import cli_errors

# Re-exported: callers (train, predict, evaluate, convert, visualize, the tests) import them from here.
from pixelbert_jax.checkpoint_files import (  # noqa: F401
    ITEMS,
    TMP_MARKER,
    CheckpointMismatchError,
    CheckpointSaveError,
    UnreadableCheckpointError,
    compare_shapes,
    handlers,
    nonfinite_leaves,
    out_of_memory,
    remove_tmp_dirs,
    resolve_checkpoint_dir,
)
from pixelbert_jax.checkpoint_variables import (  # noqa: F401
    load_model_variables,
    merge_pretrained,
    save_model_variables,
)


class Restored(NamedTuple):
  """What a resumed run gets back: the train state, the data iterator's state, the step and the log window."""

  state: dict[str, Any]
  data_state: dict
  step: int
  log_window: dict


class Checkpointer:
  """A CheckpointManager that saves every `every_steps`, keeps `keep`, and resumes from the newest
  readable step (a corrupted newest step is reported by name and skipped)."""

  def __init__(self, directory: str | epath.Path, *, every_steps: int, keep: int, use_async: bool = True):
    if int(keep) < 1:  # Orbax would delete every checkpoint, the final one included
      raise ValueError(f"config.keep_checkpoints={keep} must be >= 1")
    self.directory = epath.Path(directory)
    if jax.process_index() == 0:
      remove_tmp_dirs(self.directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(every_steps)),
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=use_async,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers())
    self._saving: int | None = None  # the step of the newest save started (async: it may still be in flight)

  def save(
      self,
      step: int,
      state: dict[str, Any],
      data_state: dict | None,
      meta: dict,
      *,
      log_window: dict | None = None,
      force: bool = False,
  ) -> bool:
    """`log_window`: JSON, train.py's metric sums since the last logged step (copied: the save is async)."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave({"params": state["params"], "batch_stats": state["batch_stats"]}),
        train=ocp.args.StandardSave({k: state[k] for k in ("step", "opt_state", "rng")}),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta),
        log=ocp.args.JsonSave(json.loads(json.dumps(log_window or {}))),
    )
    with self._failures():  # Orbax raises the previous async save's failure here
      saved = self.manager.save(step, args=args, force=force)
    if saved:
      self._saving = step
    return saved

  def check(self) -> None:
    """Raises the failure of a background save that has ended (a full disk), without waiting for one still in
    flight: cheap enough for every step, so that a run stops at the step after a failed save rather than
    training on to the next save (or to its end)."""
    holder = getattr(self.manager, "_finalize_thread", None)  # Orbax's save in flight (private, hence getattr)
    thread = holder.get() if hasattr(holder, "get") else None
    if thread is not None and not thread.is_alive() and getattr(thread, "exception", None) is not None:
      self.wait()  # raises the thread's exception
    elif holder is None:  # another Orbax: its public check (which may wait for a metadata write)
      with self._failures():
        self.manager.check_for_errors()

  @contextlib.contextmanager
  def _failures(self):
    """A save's ENOSPC, re-raised as CheckpointSaveError naming the step folder and the free space now
    (before close() removes the unfinished folder)."""
    try:
      yield
    except CheckpointSaveError:
      raise
    except Exception as e:
      if cli_errors.disk_full(e) is None or self._saving is None:
        raise
      step_dir = self.directory / f"{self._saving}{TMP_MARKER}"
      if not step_dir.exists():
        found = [p for p in self.directory.iterdir() if p.name.startswith(f"{self._saving}{TMP_MARKER}")]
        step_dir = found[0] if found else self.directory / str(self._saving)
      try:
        free = shutil.disk_usage(self.directory).free if "://" not in str(self.directory) else None
      except OSError:
        free = None
      raise CheckpointSaveError(self._saving, step_dir, free, e) from e

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception:  # No preemption service outside jax.distributed: SIGTERM is handled by train.py.
      return False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, abstract_state: dict[str, Any]) -> Restored | None:
    """Restores the newest good step into `abstract_state`'s shapes and shardings, or None if there
    is none. Shape mismatches are config errors and raise; a step that cannot be read or holds non-finite
    parameters is moved aside (named in the log), so that the rerun retrains it instead of finding it in
    the way when it saves that step again. A step saved before the `log` item existed restores with an
    empty log window."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    moved = False
    try:
      for step in steps:
        step_dir = self.directory / str(step)
        try:
          found = self.manager.item_metadata(step)["params"]
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means a bad step
          moved = self._move_aside(step, f"is unreadable ({cli_errors.first_line(e, with_type=True)})")
          continue
        if found is None:
          moved = self._move_aside(step, "has no 'params' item")
          continue
        expected = {"params": abstract_state["params"], "batch_stats": abstract_state["batch_stats"]}
        compare_shapes(expected, dict(found), what=f"Checkpoint {step_dir}")
        items = dict(
            params=ocp.args.StandardRestore(expected),
            train=ocp.args.StandardRestore({k: abstract_state[k] for k in ("step", "opt_state", "rng")}),
            data=ocp.args.JsonRestore(),
        )
        if (step_dir / "log").exists():
          items["log"] = ocp.args.JsonRestore()
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
          if out_of_memory(e):  # says nothing about the files: keep the step where it is
            raise
          moved = self._move_aside(step, f"could not be restored ({cli_errors.first_line(e, with_type=True)})")
          continue
        bad = nonfinite_leaves(restored["params"])
        if bad:  # written before train.py checked parameters before saving them
          moved = self._move_aside(step, f"holds NaN/Inf in {len(bad)} parameter arrays (first: {bad[0]})")
          continue
        state = {**restored["params"], **restored["train"]}
        log_window = dict(restored["log"] or {}) if "log" in items else {}
        return Restored(state, dict(restored["data"] or {}), step, log_window)
    finally:
      if moved:
        self.manager.reload()  # forget the moved steps: their numbers are saved afresh
    if steps:  # starting from scratch silently could throw away a long run's progress
      raise UnreadableCheckpointError(
          f"No readable checkpoint in {self.directory}: steps {steps} were moved aside (STEP.corrupt-*); "
          "rerun to start from scratch, or move a step folder back if it is good"
      )
    return None

  def _move_aside(self, step: int, why: str) -> bool:
    """Renames step folder N to `N.corrupt-<time>` (which Orbax does not list) and says so."""
    source = self.directory / str(step)
    target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0 and source.exists():
      source.rename(target)
    logging.error("Checkpoint %s %s; moved it to %s and trying the previous step.", source, why, target)
    return True

  def wait(self) -> None:
    with self._failures():
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
      self.manager.close()
    finally:  # a save that failed (disk full) leaves its tmp folder; free that space now
      if jax.process_index() == 0:
        remove_tmp_dirs(self.directory)
