"""Shared by the training tests: a tiny pre-training config and ways to run it in and out of process."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from flax import traverse_util

from pixelbert_jax.config_files import load_sibling

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str = "pretrain", variant: str = "demo"):
  return load_sibling(str(REPO / "configs" / "pretrain.py"), name).get_config(variant)


def tiny_overrides(data_dir: str, total_steps: int = 4) -> dict:
  """Flat `--config.KEY=VALUE` overrides that make the demo config test-sized."""
  return {
      "data.data_dir": data_dir,
      "data.synthetic.num_train": 48,
      "data.synthetic.num_val": 16,
      "data.synthetic.num_test": 16,
      "model.hidden_size": 32,
      "model.num_layers": 2,
      "model.num_heads": 2,
      "model.intermediate_size": 64,
      "model.cnn.stem_width": 8,
      "model.cnn.base_planes": 4,
      "model.cnn.norm": "bn",
      "model.pixel_sampling.num_pixels": 4,
      "batch_size": 8,
      "eval_batch_size": 8,
      "total_steps": total_steps,
      "log_every_steps": 1,
      "eval_every_steps": 0,
      "eval_steps": 1,
      "checkpoint_every_steps": 2,
      "optim.warmup_steps": 2,
      # One device, as in the in-process runs they are compared with bit for bit (the demo's 2 data-parallel
      # CPU devices sum gradients in another order; test_two_cpu_devices_* covers them).
      "cpu_devices": 1,
  }


def tiny_config(data_dir: str, total_steps: int = 4, variant: str = "demo_hard", **extra):
  """`variant` demo_hard (default): a CNN that trains and dropout on, for the mechanics under test (resume,
  sharding, dropout keys, conversion); the `demo` recipe's warm start and frozen CNN: test_learning.py."""
  config = load_config(variant=variant)
  for key, value in {**tiny_overrides(data_dir, total_steps), **extra}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def main_command(workdir: str, overrides: dict) -> list[str]:
  return [
      sys.executable,
      "-m",
      "pixelbert_jax.main",
      "--config=configs/pretrain.py:demo_hard",
      f"--workdir={workdir}",
  ] + [f"--config.{k}={v}" for k, v in overrides.items()]


def run_main(
    workdir: str,
    overrides: dict,
    env: dict | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
  return subprocess.run(
      main_command(workdir, overrides),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={**os.environ, **(env or {})},
  )


def final_params(workdir: str | pathlib.Path) -> dict[str, np.ndarray]:
  from pixelbert_jax.checkpoint import load_model_variables

  variables, _, step = load_model_variables(workdir)
  flat = traverse_util.flatten_dict(variables, sep="/")
  return {"step": step, **{k: np.asarray(v) for k, v in flat.items()}}


def metrics(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_same_params(a: dict, b: dict, atol: float = 0.0) -> None:
  assert a.keys() == b.keys()
  for k in a:
    if atol == 0.0:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)
