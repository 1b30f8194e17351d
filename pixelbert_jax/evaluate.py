"""Evaluates a training workdir's checkpoint on any split, after training: the same evaluator training runs.

  python -m pixelbert_jax.evaluate --checkpoint WORKDIR [--split test] [--step N]

The run's own config.json (beside its checkpoints/) says the task, the data and the model; `--split` picks
another split of the same data (default: the config's `data.eval_split`), always in full. The metrics go to
stdout as one JSON object (the `eval/...` keys training logs; VQA: tasks/vqa.py explains its keys), and the
task's result file to WORKDIR/results/ as in training (e.g. `vqa_test_step2.json`). One process, the devices
it sees. Bad input gets a one-line `error: ...` and exit code 2, any other failure one line and exit code 1
(`--verbose`: with the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

import ml_collections

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import cli_errors, partitioning, paths


class EvaluateError(ValueError):
  """Bad input to the evaluation; the message is one line naming what was wrong."""


def load_run_config(checkpoint: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the run's config from config.json, its workdir) for a workdir, its checkpoints/ or a step folder."""
  try:
    directory, _ = ckpt_lib.resolve_checkpoint_dir(paths.resolve(checkpoint))
  except FileNotFoundError as e:
    raise EvaluateError(str(e)) from e
  config_path = directory.parent / "config.json"
  if not config_path.exists():
    raise EvaluateError(f"checkpoint {checkpoint}: no config.json beside it at {config_path}")
  raw = json.loads(config_path.read_text())
  # JSON has no tuples: give back the tuples the configs hold (buckets are hashed, the mesh shape compared),
  # before ConfigDict fixes each field's type.
  raw["data"]["buckets"] = tuple(tuple(b) for b in raw["data"]["buckets"])
  raw["mesh_shape"] = tuple(raw["mesh_shape"])
  return ml_collections.ConfigDict(raw), str(directory.parent)


def evaluate(checkpoint: str, split: str | None = None, step: int | None = None) -> dict[str, float]:
  """The task's evaluation of `checkpoint` (newest step, or `step`) on `split`; writes its result file.

  Builds the model context only (model_context.py): no optimizer, and no split opened but the evaluated one.
  The run's config.json holds every size the data gave it, so nothing is read off the training data."""
  from pixelbert_jax import model_context, tasks  # after argument parsing: imports the model and the data
  from pixelbert_jax.data.task_data import TaskData

  config, workdir = load_run_config(checkpoint)
  config.data.eval_split = split or config.data.eval_split
  config.eval_steps = -1  # a training run may cap its periodic evaluations; this one is the whole split
  context = model_context.ModelContext(config, partitioning.make_mesh(config.mesh_shape))
  try:
    state, found = context.restore_variables(paths.resolve(checkpoint), step)
  except FileNotFoundError as e:
    raise EvaluateError(str(e)) from e
  logging.info(
      "Evaluating %s step %d (task %s) on %s/%s", workdir, found, config.task, config.data.name, config.data.eval_split
  )
  data = TaskData(config.data, config.task)  # opens the evaluated split when the evaluation reads it
  if config.get("cache_cnn_features", False):  # as the run evaluated: the frozen CNN's cached features
    from pixelbert_jax import feature_cache

    data.features = feature_cache.build_cache(context, data, state, config.data.eval_split)
  return {"step": found, **tasks.get_evaluate(config.task)(context, data, state, workdir)}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixelbert_jax.evaluate", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="training workdir, its checkpoints/ or a step folder")
  parser.add_argument("--split", default=None, help="split of the run's dataset (default: its data.eval_split)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

  def body() -> dict[str, float]:
    return dict(sorted(evaluate(args.checkpoint, args.split, args.step).items()))

  # Bad input (the messages name the file, split or key already) is exit status 2; anything else 1, one line.
  return cli_errors.run_command(
      body,
      usage_errors=(EvaluateError, ckpt_lib.CheckpointMismatchError, ValueError, FileNotFoundError),
      verbose=args.verbose,
  )


if __name__ == "__main__":
  sys.exit(main())
