"""Orbax checkpoints of a training run: save, resume, partial restore for fine-tuning.

One checkpoint step holds five items, so that each reader takes only what it needs:
  `params` — {'params', 'batch_stats'}: the model (what fine-tuning and PyTorch export read),
  `train`  — {'step', 'opt_state', 'rng'}: the rest of the train state,
  `data`   — the input pipeline's iterator state (JSON), so a resumed run sees exactly the next batch,
  `meta`   — task, model config and vocabulary size (JSON), so a checkpoint describes itself,
  `log`    — the metric sums of the steps since the last logged one (JSON), so that a resumed run's next
             `metrics.jsonl` row averages the same steps as an uninterrupted run's (absent before it existed).

Only finite parameters are saved (train.py checks before each save). A step that cannot be read, or whose
parameters are not finite (written before that check existed), is skipped: training moves it aside to
`STEP.corrupt-<time>` so that a rerun retrains that step; the read-only readers (predict, convert,
init_from) use the newest good step and log which. A step that a running job's rotation deletes while
one of those readers reads it is told apart from a corrupt one, and the reader retries with the newest step
left (`load_model_variables`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

ITEMS = ("params", "train", "data", "meta", "log")


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  # Registered up front so that a fresh process can read item metadata before any save or restore.
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
    super().__init__(errno.ENOSPC, f"Saving checkpoint step {step} failed: {_first_line(cause)}")
    self.step, self.step_dir, self.free_bytes = step, step_dir, free_bytes


def _no_space(e: BaseException) -> bool:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


class Restored(NamedTuple):
  """What a resumed run gets back: the train state, the data iterator's state, the step and the log window."""

  state: dict[str, Any]
  data_state: dict
  step: int
  log_window: dict


TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step (or item) folder that was never finalised


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


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _out_of_memory(e: BaseException) -> bool:
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)


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
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
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
      if not _no_space(e) or self._saving is None:
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
          moved = self._move_aside(step, f"is unreadable ({_first_line(e)})")
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
          if _out_of_memory(e):  # says nothing about the files: keep the step where it is
            raise
          moved = self._move_aside(step, f"could not be restored ({_first_line(e)})")
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
  if _is_step_dir(path):
    return path.parent, int(path.name)
  steps = _steps(path)
  if not steps:
    raise FileNotFoundError(
        f"{path} holds no checkpoint (expected a workdir, its checkpoints/ folder, "
        "or a step folder with a params/ item)"
    )
  return path, steps[-1]


def _is_step_dir(path: epath.Path) -> bool:
  return path.name.isdigit() and (path / "params").is_dir()


def _steps(directory: epath.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if _is_step_dir(p))


def load_model_variables(
    path: str | epath.Path, step: int | None = None, *, deleted_wait_s: float = 2.0, max_rounds: int = 5
) -> tuple[dict, dict, int]:
  """Reads only the `params` and `meta` items of a checkpoint, as host numpy arrays.

  Given a workdir or its checkpoints/ folder and no `step`: the newest step that can be read and holds
  finite parameters; a newer one that cannot is named in a warning with the step used instead (a run
  killed while saving, a truncated copy). A step folder or `step` means that step, or an error.

  Beside a live run, its rotation (`keep_checkpoints`) may delete the step being read. A step whose folder
  is gone after a failed read (within `deleted_wait_s`: Orbax deletes file by file), or gone once it was
  read, counts as deleted by a running job, not as corrupt: the steps are listed again and the newest one
  left is read, with a warning saying so, up to `max_rounds` times. An explicit step that is deleted is an
  error saying so."""
  directory, newest = resolve_checkpoint_dir(path)
  explicit = step is not None or _is_step_dir(epath.Path(path))
  if step is None:
    step = newest
  if explicit and not (directory / str(step) / "params").is_dir():
    raise FileNotFoundError(f"{directory} has no step {step} (steps: {_steps(directory)})")
  skipped: list[str] = []  # "step N <why>", newest first
  bad: set[int] = set()
  deleted: list[int] = []
  found = None
  for _ in range(max_rounds):
    # The newest step first; after a deletion the steps are listed again (the running job saved a newer one).
    candidates = [step] if explicit else [s for s in reversed(_steps(directory)) if s not in bad]
    relist = False
    manager = ocp.CheckpointManager(
        directory, item_handlers=_handlers(), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    )
    try:
      for candidate in candidates:
        why = ""
        try:
          variables, meta = _read_model_variables(manager, directory, candidate)
          flat = traverse_util.flatten_dict(variables, sep="/").items()
          nonfinite = [k for k, v in flat if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all()]
          if nonfinite:
            why = f"holds NaN/Inf in {len(nonfinite)} parameter arrays (first: {nonfinite[0]})"
          failure = None
        except Exception as e:  # noqa: BLE001 - any failure to read makes the step unusable
          failure = e
        step_dir = directory / str(candidate)
        if _vanished(step_dir, deleted_wait_s if failure is not None else 0.0):
          deleted.append(candidate)
          if explicit:
            raise UnreadableCheckpointError(
                f"Checkpoint {step_dir} was deleted while it was read, by a running job "
                f"({_running_job(directory)}); read a step it keeps, or give no step for the newest"
            )
          logging.warning(
              "Checkpoint %s was deleted while it was read, by a running job (%s); retrying with the newest "
              "step left.",
              step_dir,
              _running_job(directory),
          )
          relist = True
          break
        if failure is not None:
          why = f"is unreadable (corrupt or incomplete: {_first_line(failure)})"
        if not why:
          found = candidate
          break
        if explicit:
          raise UnreadableCheckpointError(f"Checkpoint {step_dir} {why}")
        bad.add(candidate)
        skipped.append(f"step {candidate} {why}")
    finally:
      manager.close()
    if not relist:
      break
  if found is None:
    why = skipped + [f"step {s} was deleted while it was read, by a running job" for s in deleted]
    if deleted:
      why.append(
          f"the job ({_running_job(directory)}) deletes steps faster than they are read: raise its "
          "keep_checkpoints, or copy a step folder and read the copy"
      )
    raise UnreadableCheckpointError(f"No usable checkpoint in {directory}: {'; '.join(why) or 'no step is left'}")
  if skipped:
    logging.warning("Checkpoint %s: %s; using step %d.", directory, "; ".join(skipped), found)
  elif deleted:
    logging.warning("Checkpoint %s: using step %d (step %s deleted by a running job).", directory, found, deleted)
  return variables, meta, found


def _vanished(step_dir: epath.Path, wait_s: float) -> bool:
  """Whether `step_dir` is gone, or goes within `wait_s` (a deletion in progress)."""
  deadline = time.monotonic() + wait_s
  while step_dir.exists():
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.05)
  return True


def _running_job(directory: epath.Path) -> str:
  """Which job rotates `directory`'s steps, as far as this host can tell: the workdir's run.lock names it."""
  lock = directory.parent / "run.lock"
  try:
    holder = json.loads(lock.read_text())
    return f"pid {holder['pid']} on {holder['host']}, {lock}"
  except Exception:  # noqa: BLE001 - no lock (gs://, or it ended meanwhile), or one being written
    return "its checkpoint rotation"


def _read_model_variables(manager: ocp.CheckpointManager, directory: epath.Path, step: int) -> tuple[dict, dict]:
  metadata = manager.item_metadata(step)["params"]
  if metadata is None:
    raise FileNotFoundError(f"{directory / str(step)} has no readable 'params' item")
  # Onto this process's first device, whatever topology saved it (a pod's checkpoint on a laptop).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), dict(metadata))
  restored = manager.restore(
      step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
  )
  variables = jax.tree.map(np.asarray, dict(restored["params"]))
  variables.setdefault("batch_stats", {})
  return variables, dict(restored["meta"] or {})


def merge_pretrained(
    fresh: dict,
    pretrained: dict,
    *,
    source: str,
    required_prefix: str = "encoder",
) -> tuple[dict, list[str], list[str]]:
  """Copies every pretrained leaf whose path and shape match into `fresh` (new heads stay fresh).

  Leaves under `required_prefix` must all be present and of the right shape: a backbone that does not
  fit is a config error, not something to initialise at random silently."""
  flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
  flat_pre = traverse_util.flatten_dict(pretrained, sep="/")
  backbone = {k: v for k, v in flat_fresh.items() if k.split("/")[0] == required_prefix}
  compare_shapes(
      traverse_util.unflatten_dict(backbone, sep="/"),
      traverse_util.unflatten_dict({k: v for k, v in flat_pre.items() if k in backbone}, sep="/"),
      what=f"The backbone ({required_prefix}) in {source}",
  )
  loaded, kept_fresh = [], []
  for k, v in flat_fresh.items():
    if k in flat_pre and np.shape(flat_pre[k]) == np.shape(v):
      flat_fresh[k] = flat_pre[k]
      loaded.append(k)
    else:
      kept_fresh.append(k)
  return traverse_util.unflatten_dict(flat_fresh, sep="/"), loaded, kept_fresh


def save_model_variables(directory: str | epath.Path, variables: dict, meta: dict) -> epath.Path:
  """Writes a model-only checkpoint (step 0, items `params` and `meta`) that `load_model_variables`
  and `config.init_from` / `config.init_from_torch` read like a training checkpoint."""
  directory = epath.Path(directory)
  manager = ocp.CheckpointManager(
      directory,
      item_handlers={"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
  )
  try:
    manager.save(
        0,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(
                {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
            ),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    manager.wait_until_finished()
  finally:
    manager.close()
  return directory / "0"
