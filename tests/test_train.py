"""The pre-training system end to end on a tiny model: workdir contents, resume, preemption, bad checkpoints."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import train
from tests import train_helpers as th


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted 6-step run: what every interrupted or resumed run must reproduce exactly."""
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
  return workdir


@pytest.mark.slow
def test_workdir_has_config_metrics_checkpoints(reference):
  assert (reference / "config.json").exists()
  assert list((reference / "tensorboard").iterdir())
  rows = th.metrics(reference)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for key in ("train/mlm_acc", "train/itm_acc", "train/lr", "perf/examples_per_s"):
    assert key in train_rows[-1], key
  evals = [r for r in rows if "eval/itm_acc" in r]
  assert evals and evals[-1]["step"] == 6
  for key in (
      "eval/mlm_acc",
      "eval/mlm_acc_grounded",
      "eval/mlm_acc_grounded_shuffled",
      "eval/mlm_grounded_majority_rate",
  ):
    assert key in evals[-1], key
  assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]


@pytest.mark.slow
def test_rerun_resumes_and_matches_an_uninterrupted_run(data_dir, reference, tmp_path):
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=3), str(tmp_path))
  # total_steps is part of the schedule only through warm-up (2 steps), so 3 then 6 equals 6.
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(tmp_path))
  steps = [r["step"] for r in th.metrics(tmp_path) if "train/loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6], "the rerun must continue after step 3, not start again"
  th.assert_same_params(th.final_params(tmp_path), th.final_params(reference))


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_parameters(data_dir, reference, tmp_path):
  overrides = th.tiny_overrides(data_dir, total_steps=6)
  kill_at = random.Random().randint(2, 5)
  proc = subprocess.Popen(
      th.main_command(str(tmp_path), overrides), cwd=th.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None:
    if any(r.get("step", 0) >= kill_at for r in th.metrics(tmp_path)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = th.run_main(str(tmp_path), overrides)
  assert done.returncode == 0, done.stderr[-3000:]
  th.assert_same_params(th.final_params(tmp_path), th.final_params(reference))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(data_dir, tmp_path):
  overrides = {**th.tiny_overrides(data_dir, total_steps=200), "checkpoint_every_steps": 1000}
  proc = subprocess.Popen(
      th.main_command(str(tmp_path), overrides),
      cwd=th.REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and not th.metrics(tmp_path):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  last_logged = max(r["step"] for r in th.metrics(tmp_path))
  assert max(steps) == last_logged < 200, (steps, last_logged)  # saved where it stopped, not at the end
  assert "SIGTERM" in err


@pytest.mark.slow
def test_corrupted_latest_checkpoint_is_named_and_skipped(data_dir, reference, tmp_path, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  damaged = workdir / "checkpoints" / "4"
  for f in (damaged / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
  with caplog.at_level(logging.ERROR):
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
  assert str(damaged) in caplog.text
  th.assert_same_params(th.final_params(workdir), th.final_params(reference))


@pytest.mark.slow
def test_config_that_does_not_fit_the_checkpoint_names_the_parameter(data_dir, reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  config = th.tiny_config(data_dir, total_steps=8, **{"model.intermediate_size": 48})
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"intermediate.*\(32, 48\).*\(32, 64\)"):
    train.train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_metric(data_dir, tmp_path, monkeypatch):
  """A NaN loss at step 1 (Orbax saves a fresh run's first step) stops the run before that step is saved.
  The config checks refuse a NaN weight; with them off it makes the NaN loss this check stands behind."""
  from pixelbert_jax import config_checks

  monkeypatch.setattr(config_checks, "validate", lambda config: None)
  config = th.tiny_config(data_dir, total_steps=4, **{"loss.itm_weight": float("nan")})
  with pytest.raises(train.NonFiniteLossError, match=r"Step 1: train/\w*loss is nan.*no checkpoint was saved"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_init_from_copies_the_encoder(data_dir, reference, tmp_path):
  config = th.tiny_config(
      data_dir, total_steps=1, **{"init_from": str(reference), "optim.transformer.lr": 0.0, "optim.cnn.lr": 0.0}
  )
  train.train_and_evaluate(config, str(tmp_path))
  got, want = th.final_params(tmp_path), th.final_params(reference)
  for k in want:
    if k.startswith("params/encoder/"):  # cnn, visual and bert
      assert (got[k] == want[k]).all(), k


@pytest.mark.slow
def test_one_step_is_the_same_on_1_device_and_on_sharded_meshes(data_dir, tmp_path):
  """8 forced CPU devices: mesh data=4 x tensor=2 and data=2 x fsdp=4 against one device (float32)."""
  import numpy as np

  out = tmp_path / "steps.npz"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
      [sys.executable, "-m", "tests.sharded_step", data_dir, str(out)],
      cwd=th.REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, **env},
  )
  assert done.returncode == 0, done.stderr[-3000:]
  r = dict(np.load(out))
  for layout in ("data4_tensor2", "data2_fsdp4"):
    assert int(r[f"{layout}:num_sharded_params"]) > 0, f"{layout}: nothing was sharded"
    np.testing.assert_allclose(r[f"{layout}:loss"], r["single:loss"], atol=1e-5, rtol=0)
    names = [k.split(":", 1)[1] for k in r if k.startswith("single:params/")]
    for name in names:
      np.testing.assert_allclose(
          r[f"{layout}:{name}"], r[f"single:{name}"], atol=1e-5, rtol=0, err_msg=f"{layout} {name}"
      )


@pytest.mark.slow
def test_two_processes_reach_the_parameters_of_one(data_dir, reference, tmp_path):
  """Two CPU processes joined through the PIXELBERT_* variables (the launch scripts' path) see the same
  global batches as one process, so after 6 steps they hold the same parameters."""
  port = _free_port()
  overrides = th.tiny_overrides(data_dir, total_steps=6)
  procs = [
      subprocess.Popen(
          th.main_command(str(tmp_path), overrides),
          cwd=th.REPO,
          text=True,
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
          env={
              **os.environ,
              "JAX_PLATFORMS": "cpu",
              "PIXELBERT_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
              "PIXELBERT_NUM_PROCESSES": "2",
              "PIXELBERT_PROCESS_ID": str(i),
          },
      )
      for i in (0, 1)
  ]
  errors = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-3000:]
  assert "process 1/2" in errors[1].lower() or "Process 1/2" in errors[1]
  th.assert_same_params(th.final_params(tmp_path), th.final_params(reference), atol=1e-5)


@pytest.mark.slow
def test_two_cpu_devices_reach_the_parameters_of_one(data_dir, reference, tmp_path):
  """config.cpu_devices=2 (the demo's setting): main splits the CPU into two data-parallel devices, and
  6 steps end where the single-device run does (the BN statistics are the global batch's on both)."""
  done = th.run_main(str(tmp_path), {**th.tiny_overrides(data_dir, total_steps=6), "cpu_devices": 2})
  assert done.returncode == 0, done.stderr[-3000:]
  assert "2 local / 2 global cpu devices" in done.stderr, done.stderr[-3000:]
  th.assert_same_params(th.final_params(tmp_path), th.final_params(reference), atol=1e-5)


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_relative_workdir_and_tilde_paths(data_dir, tmp_path):
  """The README passes `--workdir=workdirs/demo`; Orbax refuses relative paths unless they are resolved. A `~`
  after `=` reaches main unexpanded (bash leaves it), in `--config=` and in `--config.data.data_dir=` alike."""
  home = tmp_path / "home"
  home.mkdir()
  (home / "configs").symlink_to(th.REPO / "configs")
  (home / "tfds").symlink_to(data_dir)  # the session's synthetic world, reached through '~'
  overrides = {**th.tiny_overrides("~/tfds", total_steps=2), "checkpoint_every_steps": 1}
  cmd = th.main_command("workdirs/rel", overrides)
  cmd[3] = "--config=~/configs/pretrain.py:demo_hard"
  result = subprocess.run(
      cmd,
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "PYTHONPATH": str(th.REPO), "HOME": str(home)},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  workdir = tmp_path / "workdirs" / "rel"
  assert (workdir / "checkpoints" / "2").is_dir()
  assert not (tmp_path / "~").exists(), "a folder literally named '~' was written"
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data"]["data_dir"] == str(home / "tfds")  # resolved once, recorded absolute
