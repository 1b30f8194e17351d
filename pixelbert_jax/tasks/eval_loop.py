"""Shared by the task evaluators: metrics summed over a held-out split (`metric_sums`), per-example
predictions (`collect`), and result files. Batches come from the run's data (data/task_data.py's
`TaskData`), whose splits are opened once per run.

Official metrics need every example's prediction joined to its id, so those evaluators `collect`. Ids stay
on the host (question ids are int64 and JAX
runs in 32 bits); across processes they are gathered in the same order as the global batch.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath

from pixelbert_jax import partitioning
from pixelbert_jax.models import build

PredictFn = Callable[[Callable, dict], dict]  # (apply, device batch) -> {name: [B, ...]}
MetricsFn = Callable[[Callable, dict, Any], dict]  # (apply, device batch, config) -> {name: (sum, count)}
_JITTED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _jitted(context, fn: Callable, *extra):
  """`fn(apply, batch, *extra)` jitted once per context (`extra`: trace-time constants such as the config)."""
  cache = _JITTED.setdefault(context, {})
  if fn not in cache:

    def run(params, batch_stats, batch):
      bound = build.variables(params, batch_stats)
      apply = lambda **kw: context.model.apply(bound, train=False, **kw)
      return fn(apply, batch, *extra)

    cache[fn] = jax.jit(
        run, out_shardings=partitioning.replicated(context.mesh), compiler_options=context.compiler_options
    )
  return cache[fn]


def mesh_context(context):
  """The mesh and logical rules that model calls are traced in."""
  return partitioning.activate(context.mesh)


def _eval_batches(context, data, split: str):
  cfg = context.config
  it = data.iterator(
      split,
      batch_size=cfg.eval_batch_size // jax.process_count(),
      seed=cfg.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      train=False,
  )
  for i, batch in enumerate(it):
    if 0 < cfg.eval_steps <= i:
      return
    yield batch


def metric_sums(context, data, state, split: str, metrics_fn: MetricsFn) -> dict[str, Any]:
  """`metrics_fn` over `split` (one pass, eval mode), its values summed over the batches: (sum, count)
  pairs stay pairs, arrays (histograms) are added. `config.eval_steps` > 0 caps the batches."""
  fn = _jitted(context, metrics_fn, context.config)
  sums: dict[str, Any] = {}
  for batch in _eval_batches(context, data, split):
    with mesh_context(context):
      m = fn(state["params"], state["batch_stats"], partitioning.global_batch(batch, context.mesh))
    for k, v in jax.device_get(m).items():
      sums[k] = v if k not in sums else jax.tree.map(np.add, sums[k], v)
  if not sums:
    raise ValueError(f"split {split!r} of {context.config.data.name!r} gave no evaluation batches")
  return sums


def _gather_host(x: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils

  x = np.asarray(x, np.int64)  # 32-bit halves: JAX without x64 would truncate int64 ids
  hi, lo = (x >> 32).astype(np.int32), (x & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
  hi, lo = (np.asarray(multihost_utils.process_allgather(v, tiled=True)) for v in (hi, lo))
  return (hi.astype(np.int64) << 32) | lo.view(np.uint32).astype(np.int64)


def collect(
    context,
    data,
    state,
    split: str,
    predict_fn: PredictFn,
    *,
    device_keys: Sequence[str],
    host_keys: Sequence[str] = (),
) -> dict[str, np.ndarray]:
  """Runs `predict_fn` over `split` (one pass, eval mode) and concatenates its outputs and the
  `host_keys` of the batches, real examples only (example_mask > 0). `config.eval_steps` > 0 caps it."""
  fn = _jitted(context, predict_fn)
  parts: dict[str, list] = {}
  for batch in _eval_batches(context, data, split):
    device_batch = {k: batch[k] for k in device_keys}
    with mesh_context(context):
      out = jax.device_get(
          fn(state["params"], state["batch_stats"], partitioning.global_batch(device_batch, context.mesh))
      )
    keep = _gather_host(np.asarray(batch["example_mask"])) > 0
    for k in host_keys:
      parts.setdefault(k, []).append(_gather_host(np.asarray(batch[k]))[keep])
    for k, v in out.items():
      parts.setdefault(k, []).append(np.asarray(v)[keep])
  if not parts:
    raise ValueError(f"split {split!r} of {context.config.data.name!r} gave no evaluation batches")
  return {k: np.concatenate(v) for k, v in parts.items()}


def result_path(workdir: str | epath.Path, task: str, split: str, step: int, suffix: str) -> epath.Path:
  return epath.Path(workdir) / "results" / f"{task}_{split}_step{step}.{suffix}"


def write_text(path: epath.Path, text: str) -> None:
  """Process 0 writes; atomically, so a reader never sees half a result file."""
  if jax.process_index() != 0:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(text)
  tmp.replace(path)  # not rename: epath's rename refuses an existing file, and answer_vocab.json is rewritten
  logging.info("Wrote %s", path)


def write_json(path: epath.Path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=None, separators=(",", ":")))


def step_of(state) -> int:
  return int(jax.device_get(state["step"]))
