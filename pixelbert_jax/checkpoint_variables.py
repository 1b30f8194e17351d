"""The model's variables alone, as host arrays: read from a checkpoint by predict, evaluate, convert and
`config.init_from` (beside a live run whose rotation may delete the step being read), written as a model-only
checkpoint (convert from-torch), and merged into a fresh model for fine-tuning.

The readers use the newest good step (checkpoint_files.py says what that is) and log which; a step deleted
by a running job's rotation while it is read is told apart from a corrupt one (`load_model_variables`).
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from pixelbert_jax import checkpoint_files as files
from pixelbert_jax import cli_errors


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
  directory, newest = files.resolve_checkpoint_dir(path)
  explicit = step is not None or files.is_step_dir(epath.Path(path))
  if step is None:
    step = newest
  if explicit and not (directory / str(step) / "params").is_dir():
    raise FileNotFoundError(f"{directory} has no step {step} (steps: {files.steps(directory)})")
  skipped: list[str] = []  # "step N <why>", newest first
  bad: set[int] = set()
  deleted: list[int] = []
  found = None
  for _ in range(max_rounds):
    # The newest step first; after a deletion the steps are listed again (the running job saved a newer one).
    candidates = [step] if explicit else [s for s in reversed(files.steps(directory)) if s not in bad]
    relist = False
    manager = ocp.CheckpointManager(
        directory, item_handlers=files.handlers(), options=ocp.CheckpointManagerOptions(read_only=True, create=False)
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
            raise files.UnreadableCheckpointError(
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
          why = f"is unreadable (corrupt or incomplete: {cli_errors.first_line(failure, with_type=True)})"
        if not why:
          found = candidate
          break
        if explicit:
          raise files.UnreadableCheckpointError(f"Checkpoint {step_dir} {why}")
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
    raise files.UnreadableCheckpointError(f"No usable checkpoint in {directory}: {'; '.join(why) or 'no step is left'}")
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
  files.compare_shapes(
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
