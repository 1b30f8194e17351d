"""Shared by the training tests: a tiny pre-training config and ways to run it in and out of process."""

from __future__ import annotations

import json
import os
import pathlib
import struct
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


def demo_recipe_config(data_dir: str, cache_cnn_features: bool = False):
  """The README's recipe (`demo`: the CNN warm start, which reads the train and eval splits too) at test size,
  4 steps with an evaluation at steps 2 and 4."""
  config = tiny_config(data_dir, total_steps=4, variant="demo", eval_every_steps=2, **{"cnn_warm_start.steps": 2})
  config.cnn_warm_start.batch_size = 8
  config.cache_cnn_features = cache_cnn_features
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


def without_perf(rows: list[dict]) -> list[dict]:
  """metrics.jsonl rows without perf/* (timings), the part that a resumed run must reproduce exactly."""
  return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def tensorboard_scalars(workdir: str | pathlib.Path) -> list[tuple[str, int, float]]:
  """(tag, step, value) of the scalars TensorBoard shows for WORKDIR/tensorboard: its event files in order,
  each purge (a SessionLog START at step s, written by a resumed writer) hiding the earlier events at s or
  later, as TensorBoard does."""
  from tensorboardX.proto import event_pb2

  shown: list[tuple[str, int, float]] = []
  for path in sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos + 12 <= len(data):  # TFRecord: length (8 bytes), its crc (4), the record, its crc (4)
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = [s for s in shown if s[1] < event.step]
      shown += [(v.tag, int(event.step), v.simple_value) for v in event.summary.value]
  return shown


def assert_same_params(a: dict, b: dict, atol: float = 0.0) -> None:
  assert a.keys() == b.keys()
  for k in a:
    if atol == 0.0:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    else:
      np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)
