"""train_and_evaluate(config, workdir): the mesh, the sharded state, the jitted step, the loop.

The same code runs on one CPU core, on the 8 devices of one host and on many hosts: the batch is sharded
over ('data', 'fsdp'), parameters by the logical rules in partitioning.py, and every process feeds only its
own slice of each global batch.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import accumulation, config_checks, feature_cache, init_hooks, metrics_writer, model_context
from pixelbert_jax import partitioning, paths, profiling, run_lock, tasks
from pixelbert_jax.data.task_data import TaskData
from pixelbert_jax.train_step import State


class NonFiniteLossError(FloatingPointError):
  pass


class Trainer(model_context.StepContext):
  """The step context (model_context.py) of a training run, with its data (`data`: the run's one TaskData,
  data/task_data.py, built here unless given): the -1 sizes read off the data, the run's length in steps, the
  micro-batches per step, and the task's evaluation."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, data: TaskData | None = None):
    self.data = data if data is not None else TaskData(config.data, config.task)
    # -1 in the config = from the data (vocab size, answers), filled in place: train_and_evaluate writes
    # config.json and the checkpoint's meta after this, so that predict and fine-tuning build the same model.
    self.data.resolve_sizes(config)
    n_train = self.data.num_examples(config.data.train_split)
    self.steps_per_epoch = max(1, n_train // config.batch_size)
    self.total_steps = (
        int(config.total_steps)
        if config.get("total_steps", 0) > 0
        else int(math.ceil(config.num_epochs * self.steps_per_epoch))
    )
    accum = accumulation.resolve(config, mesh, steps_per_epoch=self.steps_per_epoch)
    super().__init__(config, mesh, steps_per_epoch=self.steps_per_epoch, accum_steps=accum)
    self._evaluate = tasks.get_evaluate(config.task)

  def evaluate(self, state: State, workdir: epath.Path) -> dict[str, float]:
    """The task's evaluation (task_table.py): official metrics and result files where the task has them."""
    return self._evaluate(self, self.data, state, workdir)


def _write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Writes config.json once the run is accepted (its checkpoint restored, or a fresh start): predict reads
  it, so a rerun refused with another model must not replace it. A different earlier config is kept as
  config.<when it was written>.json."""
  if jax.process_index() != 0:
    return
  path, text = workdir / "config.json", json.dumps(config.to_dict(), indent=2, default=str)
  if path.exists() and path.read_text() != text:
    try:
      written = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().mtime))
    except (OSError, AttributeError):
      written = time.strftime("%Y%m%d-%H%M%S")
    kept = workdir / f"config.{written}.json"
    n = 1
    while kept.exists():
      n += 1
      kept = workdir / f"config.{written}-{n}.json"
    path.rename(kept)
    logging.info("The config differs from the previous run's, kept as %s", kept)
  path.write_text(text)


def _check_finite(step: int, metrics: dict[str, float]) -> None:
  for k, v in metrics.items():
    if not math.isfinite(v):
      raise NonFiniteLossError(f"Step {step}: train/{k} is {v}")


def _reduce(metric_pairs: dict) -> dict[str, float]:
  return {k: float(s / max(c, 1e-9)) for k, (s, c) in metric_pairs.items()}


class _StopFlag:
  """Turns SIGTERM and the first SIGINT (Ctrl-C) into a flag the loop checks, so the run saves a checkpoint
  at the current step and exits cleanly; a SIGINT after that aborts at once, without saving."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.raised = False
    # Python lets only the main thread set handlers; elsewhere (an embedding app) the signals stay its own.
    self._active = threading.current_thread() is threading.main_thread()
    self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS} if self._active else {}

  def _handler(self, signum, frame):
    if signum == signal.SIGINT and self.raised:
      raise KeyboardInterrupt
    logging.warning(
        "%s received: saving a checkpoint and stopping%s.",
        signal.Signals(signum).name,
        " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else "",
    )
    self.raised = True

  def restore(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def load_init(trainer: Trainer, state: State) -> State:
  """`config.init_from` / `config.init_from_torch`: copy a pretrained encoder (and matching heads)."""
  cfg = trainer.config
  source = cfg.get("init_from", "") or cfg.get("init_from_torch", "")
  if not source:
    if cfg.task != "pretrain":
      logging.warning("No config.init_from: fine-tuning %s from the backbone initialisation only.", cfg.task)
    return state
  variables, meta, step = ckpt_lib.load_model_variables(source)
  for collection in ("params", "batch_stats"):
    merged, loaded, fresh = ckpt_lib.merge_pretrained(
        jax.device_get(state[collection]), variables.get(collection, {}), source=f"{source} (step {step}, {collection})"
    )
    if collection == "params":
      logging.info(
          "Initialised %d tensors from %s (step %d, task %s); %d fresh: %s",
          len(loaded),
          source,
          step,
          meta.get("task", "?"),
          len(fresh),
          sorted({k.split("/")[0] for k in fresh}),
      )
    state[collection] = jax.device_put(merged, trainer.state_shardings[collection])
  return state


def _run_init_hook(
    trainer: Trainer, state: State, hook: init_hooks.Hook | None, writer: metrics_writer.MetricWriter, stop: _StopFlag
) -> State:
  """`config.init_hook` (init_hooks.py) on a fresh start: its state is trained from, its metrics are step 0's.
  init_hooks.Stopped passes through (nothing of the hook is kept)."""
  cfg = trainer.config
  if hook is None:
    return state
  if cfg.get("init_from", "") or cfg.get("init_from_torch", ""):
    logging.info("config.init_hook=%r skipped: the run starts from init_from", cfg.init_hook)
    return state
  state, metrics = hook(trainer, state, lambda: stop.raised)
  if metrics:
    writer.write(0, metrics)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  # Where paths enter a run (main.py and the Python API both come here): the workdir and the config's
  # data folders, vocab and init_from / init_from_torch, so that load_init and config.json see absolute ones.
  workdir = epath.Path(paths.resolve(workdir))
  paths.resolve_config(config)
  config_checks.validate(config)  # before anything runs, each bad value by key
  hook = init_hooks.resolve(config.get("init_hook", ""))  # a name that does not import fails here, as a bad value
  lock = _lock_workdir(workdir)
  try:
    return _train_and_evaluate(config, workdir, hook)
  finally:
    lock.release()


def _lock_workdir(workdir: epath.Path) -> run_lock.RunLock | run_lock.NoLock:
  """Process 0 holds WORKDIR/run.lock for the whole run (run_lock.py), taken before anything in the workdir
  is written or deleted; on several processes all of them learn whether it got it."""
  lock, error = run_lock.NoLock(), ""
  if jax.process_index() == 0:
    if workdir.exists() and not workdir.is_dir():
      raise NotADirectoryError(f"workdir {workdir} is a file, not a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
      lock = run_lock.acquire(str(workdir))
    except run_lock.WorkdirBusyError as e:
      error = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
      error = f"workdir {workdir} is in use by another run (process 0 names it)"
  if error:
    raise run_lock.WorkdirBusyError(error)
  return lock


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: epath.Path, hook: init_hooks.Hook | None
) -> dict[str, float]:
  mesh = partitioning.make_mesh(config.mesh_shape)
  partitioning.log_mesh(mesh)
  pc, pi = jax.process_count(), jax.process_index()
  dp = partitioning.data_parallel_size(mesh)
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % dp or config[name] % pc:
      raise ValueError(
          f"config.{name}={config[name]} must be divisible by the data-parallel mesh "
          f"size {dp} and the process count {pc}"
      )
  trainer = Trainer(config, mesh)
  logging.info(
      "XLA compile options of the steps: %s (pixelbert_jax/xla_options.py)",
      trainer.compiler_options or "XLA's defaults",
  )
  meta = {
      "task": config.task,
      "model": config.model.to_dict(),
      "data": config.data.name,
      "vocab_size": int(config.model.vocab_size),
  }

  checkpointer = ckpt_lib.Checkpointer(
      workdir / "checkpoints", every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints
  )
  restored = checkpointer.restore_latest(trainer.abstract_state)
  sums: dict[str, Any] = {}  # the log window: metric sums of the steps since the last logged one
  if restored is not None:
    state, start = restored.state, restored.step
    sums = _window_from_json(restored.log_window)
    logging.info("Resumed from %s at step %d", workdir / "checkpoints" / str(start), start)
    if start >= trainer.total_steps:
      # The README's command run twice: say so rather than log nothing and exit.
      checkpointer.close()
      if start == trainer.total_steps:
        _cache_cnn_features(trainer, state)
        final = _evaluation_left_over(trainer, state, workdir, start)
      else:
        final = {}
      logging.info(
          "Run already finished: %s holds step %d of %d; nothing to train (raise "
          "--config.total_steps to train further).",
          workdir / "checkpoints",
          start,
          trainer.total_steps,
      )
      return final
  else:
    state, start = trainer.init_state(config.seed), 0
    state = load_init(trainer, state)
  _write_config(config, workdir)

  writer = metrics_writer.MetricWriter(workdir, resume_step=start)
  stop = _StopFlag()  # before the init hook: a SIGTERM there stops cleanly too
  profiler = profiling.StepProfiler(config, workdir, first_step=start + 1)
  pending: tuple[int, dict] | None = None  # the previous step's metrics, fetched one step late
  final: dict[str, float] = {}
  step = start
  try:
    if start == 0:
      try:
        state = _run_init_hook(trainer, state, hook, writer, stop)
      except init_hooks.Stopped as e:
        logging.warning(
            "Stopped during %s (%s): nothing was saved (it keeps no checkpoint, and no training step had run); "
            "a rerun starts from scratch, %s included.",
            e.what,
            e.progress,
            e.what,
        )
        return {"preempted_at_step": 0.0}
    _cache_cnn_features(trainer, state)  # after the init hook, which may train the CNN before it is frozen
    train_iter = trainer.data.iterator(
        config.data.train_split,
        batch_size=config.batch_size // pc,
        seed=config.seed,
        process_index=pi,
        process_count=pc,
        train=True,
    )
    if restored is not None and restored.data_state:
      train_iter.set_state(restored.data_state)
    if start > 0 and _eval_due(trainer, start) and not _agreed(writer.has_row(start, "eval/")):
      logging.info("Step %d's evaluation is missing from metrics.jsonl (the run stopped during it): running it", start)
      final = _evaluate_and_write(trainer, state, workdir, writer, start)
    # The ETA's clock starts here: the init hook and a resumed evaluation are not training steps.
    progress = metrics_writer.ProgressLine(trainer.total_steps, start)
    t_log, n_log = time.monotonic(), 0
    while step < trainer.total_steps:
      checkpointer.check()  # a save that failed in the background (disk full) stops the run here, not at the end
      profiler.before(step + 1)  # config.profile_steps: the trace covers fetching the batch too
      batch = partitioning.global_batch(next(train_iter), mesh)
      with partitioning.activate(mesh):
        state, metrics = trainer.train_step(state, batch)
      step += 1
      profiler.after(step, state)
      if pending is not None:  # the device has finished it by now: checking costs no stall
        _accumulate(sums, pending[1], pending[0])
      pending = (step, metrics)
      n_log += 1
      if step % config.log_every_steps == 0 or step == trainer.total_steps:
        _accumulate(sums, pending[1], step)
        pending = None
        logged = {f"train/{k}": v for k, v in _reduce(sums).items()}
        logged["train/lr"] = float(trainer.schedules["transformer"](step))
        logged["train/lr_cnn"] = float(trainer.schedules["cnn"](step))
        elapsed = time.monotonic() - t_log
        logged["perf/examples_per_s"] = n_log * config.batch_size / max(elapsed, 1e-9)
        logged["perf/step_time_s"] = elapsed / max(n_log, 1)
        writer.write(step, logged)
        logging.info(progress.format(step, logged))
        sums, t_log, n_log = {}, time.monotonic(), 0
      data_state = train_iter.get_state()
      preempted = stop.raised or checkpointer.reached_preemption(step)
      if checkpointer.should_save(step) or preempted or step == trainer.total_steps:
        # Only finite steps are saved: this step's own loss (not one log interval later) and its
        # parameters, else a rerun would resume from NaN and rotation would drop the finite steps.
        if pending is not None:
          _accumulate(sums, pending[1], pending[0])
          pending = None
        bad = ckpt_lib.nonfinite_leaves({"params": state["params"], "batch_stats": state["batch_stats"]})
        if bad:
          raise NonFiniteLossError(
              f"Step {step}: {len(bad)} parameter arrays hold NaN/Inf (first: " f"{bad[0]}); not saving it"
          )
        checkpointer.save(
            step,
            state,
            data_state,
            meta,
            log_window=_window_to_json(sums),
            force=preempted or step == trainer.total_steps,
        )
      if preempted:
        checkpointer.wait()
        logging.warning("Stopped at step %d after saving a checkpoint; rerun to resume.", step)
        return {"preempted_at_step": float(step)}
      if _eval_due(trainer, step):
        final = _evaluate_and_write(trainer, state, workdir, writer, step)
    if pending is not None:
      _accumulate(sums, pending[1], pending[0])
  except NonFiniteLossError as e:
    newest = checkpointer.latest_step()
    kept = (
        "no checkpoint was saved"
        if newest is None
        else (
            f"the newest checkpoint, {workdir / 'checkpoints' / str(newest)}, holds finite parameters: rerun "
            "(e.g. with a lower learning rate) to resume from it"
        )
    )
    raise NonFiniteLossError(f"{e}; stopping ({kept}).") from None
  finally:
    profiler.close()
    stop.restore()
    checkpointer.close()
    writer.close()
  return final


def _cache_cnn_features(trainer: Trainer, state: State) -> None:
  """config.cache_cnn_features: the frozen CNN's features of every image, computed again at every start
  (from the state's CNN: deterministic, so a resumed run reads what the interrupted one did)."""
  if trainer.config.get("cache_cnn_features", False):
    trainer.data.features = feature_cache.build_cache(trainer, trainer.data, state, trainer.config.data.train_split)


def _window_to_json(sums: dict) -> dict:
  """The log window as the checkpoint's `log` item: {'sums': {metric: [sum, count]}}."""
  return {"sums": {k: [float(s), float(c)] for k, (s, c) in sums.items()}}


def _window_from_json(log_window: dict) -> dict:
  return {k: (float(s), float(c)) for k, (s, c) in log_window.get("sums", {}).items()}


def _eval_due(trainer: Trainer, step: int) -> bool:
  every = trainer.config.eval_every_steps
  return step == trainer.total_steps or (every > 0 and step % every == 0)


def _evaluate_and_write(
    trainer: Trainer, state: State, workdir: epath.Path, writer: metrics_writer.MetricWriter, step: int
) -> dict[str, float]:
  """The evaluation of `step`, part of that step: a run that stops before its row is in metrics.jsonl runs it
  again when it resumes at `step` (the row is written last, after TensorBoard's scalars)."""
  final = trainer.evaluate(state, workdir)
  writer.write(step, final)
  logging.info("eval @ %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))
  return final


def _evaluation_left_over(trainer: Trainer, state: State, workdir: epath.Path, step: int) -> dict[str, float]:
  """A finished run killed during its final evaluation: that evaluation, if metrics.jsonl lacks it."""
  if _agreed(metrics_writer.has_row(workdir, step, "eval/")):
    return {}
  logging.info("Step %d's evaluation is missing from metrics.jsonl (the run stopped during it): running it", step)
  writer = metrics_writer.MetricWriter(workdir, resume_step=step)
  try:
    return _evaluate_and_write(trainer, state, workdir, writer, step)
  finally:
    writer.close()


def _agreed(flag: bool) -> bool:
  """Process 0's `flag` on every process (only process 0 reads metrics.jsonl; an evaluation is collective)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(int(multihost_utils.broadcast_one_to_all(np.int32(flag))))


def _accumulate(sums: dict, metrics: dict, step: int) -> None:
  host = jax.device_get(metrics)
  _check_finite(step, {k: float(s) for k, (s, _) in host.items() if k.endswith("loss")})
  for k, (s, c) in host.items():
    ps, pcount = sums.get(k, (0.0, 0.0))
    sums[k] = (ps + float(s), pcount + float(c))
