"""Fault injection: what training and its tools do under NaN, corrupt checkpoints, concurrent runs, a full
disk, Ctrl-C and bad input. Each case is one row of the reliability table in docs/training.md.

Runs are the tiny pre-training model of train_helpers.py: in process where the Python API is what is tested,
as subprocesses where the command line is (one-line errors, exit codes, signals).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import checkpoint_files, config_checks, predict, run_lock, train
from tests import train_helpers as th


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted 6-step run (checkpoints 2, 4, 6): what every healed run must reproduce bit for bit."""
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def image(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "x.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
  return path


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _copy(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  return workdir


# -- checkpoints -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_at_a_saved_step_is_never_saved_and_a_rerun_resumes_from_the_last_finite_step(
    data_dir, reference, tmp_path, caplog, monkeypatch
):
  """The issue's run: a checkpoint every step, a log line every 10, a learning rate that blows up. Step 3's
  update makes the parameters infinite while its loss is still finite, and step 4's loss was checked only at
  step 5's log: the old loop saved steps 3 and 4, and keep_checkpoints=2 rotated the finite ones out."""
  every_step = {"checkpoint_every_steps": 1, "log_every_steps": 10, "keep_checkpoints": 2}
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=2, **every_step), str(tmp_path))
  blow_up = th.tiny_config(data_dir, total_steps=6, **every_step, **{"optim.transformer.lr": float("inf")})
  with pytest.raises(config_checks.ConfigError, match=r"config.optim.transformer.lr=inf must be >= 0 and <= 10"):
    train.train_and_evaluate(blow_up, str(tmp_path))  # refused before anything runs; the check behind it:
  monkeypatch.setattr(config_checks, "validate", lambda config: None)
  with pytest.raises(
      train.NonFiniteLossError,
      match=r"Step 3: \d+ parameter arrays hold NaN/Inf.*not saving it" r".*checkpoints/2, holds finite parameters",
  ):
    train.train_and_evaluate(blow_up, str(tmp_path))
  assert _steps(tmp_path) == [1, 2]
  for step in _steps(tmp_path):
    ckpt_lib.load_model_variables(tmp_path, step)  # raises on a step with NaN/Inf parameters
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=4, **every_step), str(tmp_path))
  assert "at step 2" in caplog.text
  # The same learning rate from step 2 on is the reference run's step 4 exactly.
  reference_step_4 = ckpt_lib.load_model_variables(reference, 4)[0]
  th.assert_same_params(th.final_params(tmp_path), {"step": 4, **_flat(reference_step_4)})


def _flat(variables):
  from flax import traverse_util

  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}


@pytest.mark.slow
def test_keep_checkpoints_0_is_refused_and_deletes_nothing(data_dir, reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  with pytest.raises(ValueError, match=r"config.keep_checkpoints=0 must be >= 1"):
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=8, keep_checkpoints=0), str(workdir))
  assert _steps(workdir) == [2, 4, 6]


def _truncate(step_dir):
  for f in (step_dir / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


@pytest.mark.slow
def test_truncated_newest_step_of_a_finished_run_is_healed_by_a_rerun(
    data_dir, reference, tmp_path, image, capsys, caplog
):
  """Before: predict crashed on the truncated step 6, and the rerun fell back to 4, retrained 5 and 6, then
  stopped with 'Checkpoint for step 6 already exists', on every rerun."""
  workdir = _copy(reference, tmp_path)
  _truncate(workdir / "checkpoints" / "6")
  expected = predict.Predictor(str(reference)).score(str(image), "a red star")

  def cli_score():
    capsys.readouterr()
    rc = predict.main(["--checkpoint", str(workdir), "--image", str(image), "--caption", "a red star"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)

  with caplog.at_level(logging.WARNING):
    cli_score()  # the newest good step, 4, named in the log
  assert "step 6 is unreadable" in caplog.text and "using step 4" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.ERROR):
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
  moved = [p for p in (workdir / "checkpoints").iterdir() if p.name.startswith("6.corrupt-")]
  assert len(moved) == 1 and str(moved[0]) in caplog.text
  assert _steps(workdir) == [2, 4, 6]
  th.assert_same_params(th.final_params(workdir), th.final_params(reference))
  assert cli_score() == expected
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))  # and again: nothing to do


@pytest.mark.slow
def test_init_from_and_convert_use_the_newest_good_step_and_say_which(data_dir, reference, tmp_path, caplog, capsys):
  from pixelbert_jax.convert.__main__ import main as convert_main

  source = _copy(reference, tmp_path)
  _truncate(source / "checkpoints" / "6")
  with caplog.at_level(logging.INFO):
    config = th.tiny_config(data_dir, total_steps=1, init_from=str(source))
    train.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert "step 6 is unreadable" in caplog.text and "using step 4" in caplog.text
  assert f"from {source} (step 4" in caplog.text
  assert convert_main(["to-torch", "--checkpoint", str(source), "--out", str(tmp_path / "pt"), "--no-verify"]) == 0
  assert "(step 4)" in (tmp_path / "pt" / "README.md").read_text().splitlines()[0]


@pytest.mark.slow
def test_running_out_of_memory_while_restoring_moves_no_step_aside(data_dir, reference, tmp_path, monkeypatch):
  """Only a step that cannot be read is moved aside; an allocation failure says nothing about the files."""
  import orbax.checkpoint as ocp

  workdir = _copy(reference, tmp_path)

  def no_memory(self, step, args=None):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", no_memory)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]


@pytest.mark.slow
def test_unfinished_checkpoint_folders_are_removed_at_start(data_dir, reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  leftover = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1764500000"
  (leftover / "params").mkdir(parents=True)
  (leftover / "params" / "blob").write_bytes(b"\0" * 1000)
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
  assert not leftover.exists() and _steps(workdir) == [2, 4, 6]


def test_a_tmp_folder_recreated_by_a_late_write_is_removed_too(tmp_path, monkeypatch):
  """After a failed async save, array writes still in flight recreate folders under the tmp folder once it has
  been removed: the disk-full test below found `4.orbax-checkpoint-tmp` left behind. Here the first removal is
  followed by such a write; the folder must be gone at the end all the same."""
  leftover = tmp_path / "4.orbax-checkpoint-tmp"
  (leftover / "params").mkdir(parents=True)
  real_rmtree, calls = shutil.rmtree, []

  def rmtree_then_late_write(path, *args, **kwargs):
    real_rmtree(path, *args, **kwargs)
    if not calls:
      (leftover / "params" / "late").mkdir(parents=True)
    calls.append(path)

  monkeypatch.setattr(checkpoint_files.shutil, "rmtree", rmtree_then_late_write)
  removed = checkpoint_files.remove_tmp_dirs(checkpoint_files.epath.Path(tmp_path), settle_s=0.0)
  assert removed == [leftover.name] and not leftover.exists() and len(calls) == 2


# -- one run per workdir -------------------------------------------------------------------------------------------


class _LongRun:
  """One long subprocess run, shared by the tests that need a run in progress (the concurrent run, Ctrl-C);
  started again only if a test has ended it."""

  def __init__(self, data_dir, tmp_path_factory):
    self.data_dir, self.factory, self.proc = data_dir, tmp_path_factory, None

  def __call__(self) -> tuple[subprocess.Popen, object]:
    if self.proc is None or self.proc.poll() is not None:
      self.workdir = self.factory.mktemp("long_run")
      overrides = {**th.tiny_overrides(self.data_dir, total_steps=500), "checkpoint_every_steps": 1000}
      self.proc = subprocess.Popen(
          th.main_command(str(self.workdir), overrides),
          cwd=th.REPO,
          text=True,
          stdout=subprocess.DEVNULL,
          stderr=subprocess.PIPE,
      )
      deadline = time.monotonic() + 240
      while time.monotonic() < deadline and self.proc.poll() is None and not th.metrics(self.workdir):
        time.sleep(0.05)
      assert self.proc.poll() is None, self.proc.stderr.read()[-3000:]
    return self.proc, self.workdir

  def close(self):
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()
      self.proc.communicate()


@pytest.fixture(scope="module")
def long_run(data_dir, tmp_path_factory):
  runs = _LongRun(data_dir, tmp_path_factory)
  yield runs
  runs.close()


def _one_error_line(stderr: str) -> str:
  """The stderr of a failed command: exactly one `error: ` line and no traceback."""
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  return errors[0]


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_in_one_line(data_dir, long_run):
  proc, workdir = long_run()
  second = th.run_main(str(workdir), th.tiny_overrides(data_dir, total_steps=500))
  assert second.returncode == 1
  line = _one_error_line(second.stderr)
  assert f"workdir {workdir} is in use by pid {proc.pid} on {socket.gethostname()}" in line, line
  assert proc.poll() is None, "the first run must go on"
  assert not (workdir / "error.log").exists(), "the refused run writes nothing into the other run's workdir"


@pytest.mark.slow
def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(data_dir, reference, tmp_path, caplog):
  workdir = _copy(reference, tmp_path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
  assert f"Taking over the lock {workdir / 'run.lock'} of pid {dead.pid}" in caplog.text
  assert not (workdir / "run.lock").exists(), "released at the end"


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
  (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
  with pytest.raises(run_lock.WorkdirBusyError, match=r"locked by pid 1 on elsewhere.*delete the lock file"):
    run_lock.acquire(str(tmp_path))
  (tmp_path / "free").mkdir()
  held = run_lock.acquire(str(tmp_path / "free"))
  with pytest.raises(run_lock.WorkdirBusyError, match="is in use by pid"):
    run_lock.acquire(str(tmp_path / "free"))  # the same process twice, as two in-process runs would
  held.release()
  run_lock.acquire(str(tmp_path / "free")).release()


@pytest.mark.slow
def test_metrics_jsonl_has_no_duplicate_steps_after_a_resume(data_dir, reference, tmp_path):
  """A run killed after logging steps 5 and 6 but before saving 6 resumes from 4 and logs 5 and 6 again."""
  workdir = _copy(reference, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "6")
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))
  rows = th.metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if "eval/itm_acc" in r] == [6]


# -- metrics across interruptions ---------------------------------------------------------------------------------

# Rows at steps 3 and 6, each the mean of 3 steps; evaluations at 2, 4 and 6, each on a checkpoint step (every
# 2), as every evaluation of the demo config is.
WINDOW = {"log_every_steps": 3, "eval_every_steps": 2}


@pytest.fixture(scope="module")
def reference_with_evaluations(data_dir, tmp_path_factory):
  """An uninterrupted 6-step run with WINDOW: its metrics.jsonl rows (steps 2, 3, 4, 6, 6), TensorBoard
  scalars and parameters are what an interrupted and resumed run must reproduce, perf/* apart."""
  workdir = tmp_path_factory.mktemp("reference_evaluations")
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6, **WINDOW), str(workdir))
  return workdir


def _faulted_run(data_dir, workdir, fault: dict) -> subprocess.CompletedProcess:
  """The reference's run as `python -m pixelbert_jax.main` with a fault of tests/fault_main.py."""
  command = th.main_command(str(workdir), {**th.tiny_overrides(data_dir, total_steps=6), **WINDOW})
  command[2] = "tests.fault_main"
  return subprocess.run(command, cwd=th.REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **fault})


def _assert_same_run(workdir, reference):
  assert th.without_perf(th.metrics(workdir)) == th.without_perf(th.metrics(reference))
  scalars = lambda w: sorted(s for s in th.tensorboard_scalars(w) if not s[0].startswith("perf/"))
  assert scalars(workdir) == scalars(reference)  # each step once, the evaluations' included
  th.assert_same_params(th.final_params(workdir), th.final_params(reference))


@pytest.mark.slow
@pytest.mark.parametrize("step", [4, 6])
def test_kill_9_during_an_evaluation_then_rerun_gives_the_uninterrupted_metrics(
    data_dir, reference_with_evaluations, tmp_path, step
):
  """The issue's run: kill -9 during the evaluation of a step whose checkpoint is saved (4; 6, the last).
  Before, the rerun resumed there and never evaluated that step (no eval row in metrics.jsonl or TensorBoard;
  at 6 it said 'Run already finished'), and its row at 6 averaged steps 5-6 where the uninterrupted run's
  averages 4-6."""
  done = _faulted_run(data_dir, tmp_path, {"PIXELBERT_TEST_KILL_IN_EVAL": str(step)})
  assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
  assert _steps(tmp_path)[-1] == step  # the checkpoint of the step being evaluated is complete
  assert [r["step"] for r in th.metrics(tmp_path)] == [2, 3, 4, 6][: step - 2]
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6, **WINDOW), str(tmp_path))
  _assert_same_run(tmp_path, reference_with_evaluations)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sent_during, saved, logged",
    [(4, [2, 4, 5], [2, 3, 4]), (3, [1, 2, 4], [2, 3])],
    ids=["stopped_at_5", "stopped_at_4_before_its_evaluation"],
)
def test_sigterm_between_logged_steps_then_rerun_gives_the_uninterrupted_metrics(
    data_dir, reference_with_evaluations, tmp_path, sent_during, saved, logged
):
  """SIGTERM during step 4 stops the run at 5, between the logged steps 3 and 6: before, the rerun's row at 6
  averaged step 6 alone (4 and 5 were never logged). Sent during step 3, it stops at 4, an evaluation step,
  before evaluating it: before, the rerun never did."""
  done = _faulted_run(data_dir, tmp_path, {"PIXELBERT_TEST_SIGTERM_AT": str(sent_during)})
  assert done.returncode == 0 and "SIGTERM received" in done.stderr, done.stderr[-3000:]
  assert _steps(tmp_path) == saved and [r["step"] for r in th.metrics(tmp_path)] == logged
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6, **WINDOW), str(tmp_path))
  _assert_same_run(tmp_path, reference_with_evaluations)


@pytest.mark.slow
def test_evaluate_predict_and_convert_retry_when_a_running_job_deletes_the_step_they_read(
    reference, tmp_path, image, caplog, capsys, monkeypatch
):
  """A run with keep_checkpoints=1 saves step 8 and deletes step 6 while each tool reads 6 (its rotation,
  through Orbax's restore). Before, each failed: 'No usable checkpoint ...: step 6 is unreadable'."""
  import orbax.checkpoint as ocp

  from pixelbert_jax import evaluate
  from pixelbert_jax.convert.__main__ import main as convert_main

  real_restore = ocp.CheckpointManager.restore
  workdir = tmp_path / "run"

  def rotate_while_read(self, step, *args, **kwargs):
    if step == 6 and (workdir / "checkpoints" / "6").exists():
      shutil.copytree(reference / "checkpoints" / "4", workdir / "checkpoints" / "8")  # the job's next save
      shutil.rmtree(workdir / "checkpoints" / "6")
    return real_restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", rotate_while_read)
  expected = predict.Predictor(str(reference), step=4).score(str(image), "a red star")
  tools = {
      "evaluate": lambda: evaluate.main(["--checkpoint", str(workdir)]),
      "predict": lambda: predict.main(["--checkpoint", str(workdir), "--image", str(image), "--caption", "a red star"]),
      "convert": lambda: convert_main(
          ["to-torch", "--checkpoint", str(workdir), "--out", str(tmp_path / "pt"), "--no-verify", "--overwrite"]
      ),
  }
  for tool, run in tools.items():
    if workdir.exists():
      shutil.rmtree(workdir)
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "6", workdir / "checkpoints" / "6")
    shutil.copy(reference / "config.json", workdir / "config.json")
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
      assert run() == 0, (tool, capsys.readouterr().err)
    assert f"{workdir / 'checkpoints' / '6'} was deleted while it was read, by a running job" in caplog.text, tool
    assert "corrupt" not in caplog.text, tool
    out = capsys.readouterr().out
    if tool == "evaluate":
      assert json.loads(out)["step"] == 8
    elif tool == "predict":
      assert json.loads(out) == expected
    else:
      assert "(step 8)" in (tmp_path / "pt" / "README.md").read_text().splitlines()[0]


# -- config.json ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_rejected_rerun_leaves_config_json_unchanged(data_dir, reference, tmp_path):
  """predict reads config.json (max_text_len among others): a rerun refused with another model and text length
  used to overwrite it, and predict then scored the same checkpoint differently."""
  workdir = _copy(reference, tmp_path)
  before = (workdir / "config.json").read_bytes()
  config = th.tiny_config(data_dir, total_steps=8, **{"model.intermediate_size": 48, "data.max_text_len": 20})
  with pytest.raises(ckpt_lib.CheckpointMismatchError):
    train.train_and_evaluate(config, str(workdir))
  assert (workdir / "config.json").read_bytes() == before
  assert sorted(p.name for p in workdir.glob("config*.json")) == ["config.json"]


@pytest.mark.slow
def test_an_accepted_rerun_with_another_config_keeps_the_earlier_one(data_dir, reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  before = (workdir / "config.json").read_text()
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6), str(workdir))  # finished: nothing changes
  assert sorted(p.name for p in workdir.glob("config*.json")) == ["config.json"]
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=7), str(workdir))
  kept = [p for p in workdir.glob("config.*.json")]
  assert len(kept) == 1 and kept[0].read_text() == before, kept
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 7


# -- signals -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_zero(long_run):
  """SIGINT used to exit 130 with a traceback and lose every step since the last checkpoint."""
  proc, workdir = long_run()
  time.sleep(1.0)  # a few steps past the first
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGINT received: saving a checkpoint and stopping" in err and "Traceback" not in err, err[-3000:]
  last_logged = max(r["step"] for r in th.metrics(workdir))
  assert _steps(workdir)[-1] == last_logged < 500
  assert not (workdir / "run.lock").exists()


@pytest.mark.slow
def test_sigterm_during_the_cnn_warm_start_stops_cleanly(data_dir, tmp_path):
  """Before: exit status 143, no message, run.lock left behind."""
  workdir = tmp_path / "run"
  overrides = {
      **th.tiny_overrides(data_dir, total_steps=4),
      "cnn_warm_start.steps": 100000,
      "cnn_warm_start.batch_size": 8,
  }
  log = tmp_path / "stderr.txt"
  with log.open("w") as err:
    proc = subprocess.Popen(
        th.main_command(str(workdir), overrides), cwd=th.REPO, stdout=subprocess.DEVNULL, stderr=err
    )
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None and "cnn warm start 50/100000" not in log.read_text():
    time.sleep(0.1)
  assert proc.poll() is None, log.read_text()[-3000:]
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  text = log.read_text()
  assert proc.returncode == 0, text[-3000:]
  assert (
      "Stopped during the CNN warm start (after " in text
      and "of its 100000 steps): nothing was saved" in text
      and "a rerun starts from scratch" in text
  ), text[-3000:]
  assert not (workdir / "run.lock").exists()
  assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]


def test_a_second_ctrl_c_aborts_without_saving():
  before = signal.getsignal(signal.SIGINT)
  stop = train._StopFlag()
  try:
    signal.raise_signal(signal.SIGINT)
    assert stop.raised
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before


# -- clean failures: one `error:` line ------------------------------------------------------------------------------


def _run_with_full_disk(workdir, overrides: dict, *, step: int) -> subprocess.CompletedProcess:
  """main through tests/fault_main.py, with every write under checkpoints/STEP failing with ENOSPC."""
  command = th.main_command(str(workdir), overrides)
  command[2] = "tests.fault_main"
  env = {**os.environ, "PIXELBERT_TEST_DISK_FULL": f"{workdir}:{step}"}
  return subprocess.run(command, cwd=th.REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_disk_full_is_one_line_and_the_previous_step_restores_bit_exact(data_dir, reference, tmp_path):
  """Writes under checkpoints/4 fail with ENOSPC (tests/fault_main.py). Before: 451 Orbax tracebacks, the
  unfinished 4.orbax-checkpoint-tmp left to keep the disk full, and no `error:` line."""
  workdir = tmp_path / "run"
  overrides = {**th.tiny_overrides(data_dir, total_steps=6), "keep_checkpoints": 1}
  done = _run_with_full_disk(workdir, overrides, step=4)
  assert done.returncode == 1, done.stderr[-3000:]
  line = _one_error_line(done.stderr)
  assert line.startswith(f"error: disk full: could not write {workdir / 'checkpoints' / '4'}"), line
  assert " free in " in line and f"{workdir / 'checkpoints' / '2'} is the newest complete checkpoint" in line
  noise = [s for s in done.stderr.splitlines() if not s.startswith("I")]  # absl INFO: the progress lines
  assert len(noise) < 20, "\n".join(noise)
  assert "Traceback" in (workdir / "error.log").read_text()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]  # no tmp folder left
  reference_step_2 = ckpt_lib.load_model_variables(reference, 2)[0]
  th.assert_same_params(th.final_params(workdir), {"step": 2, **_flat(reference_step_2)})
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6, keep_checkpoints=1), str(workdir))  # space freed
  th.assert_same_params(th.final_params(workdir), th.final_params(reference))


@pytest.mark.slow
def test_disk_full_stops_the_run_at_the_failed_save_and_names_the_file(data_dir, tmp_path):
  """Saves at 1, 15 and 30; writes under checkpoints/15 fail (tests/fault_main.py). Before: the async save's
  failure surfaced only at the next save, the final one, so the run trained on to step 30; the line named the
  workdir and the free space after the cleanup only."""
  workdir = tmp_path / "run"
  overrides = {**th.tiny_overrides(data_dir, total_steps=30), "checkpoint_every_steps": 15, "keep_checkpoints": 5}
  done = _run_with_full_disk(workdir, overrides, step=15)
  assert done.returncode == 1, done.stderr[-3000:]
  last = max(row["step"] for row in th.metrics(workdir) if "train/loss" in row)
  assert 15 <= last < 30, f"trained on to step {last} after the save of step 15 failed"
  line = _one_error_line(done.stderr)
  assert line.startswith(f"error: disk full: could not write {workdir / 'checkpoints' / '15.orbax-checkpoint-tmp'}/")
  assert " free in " in line and " when the write failed, " in line and " after removing the unfinished step" in line
  assert f"{workdir / 'checkpoints' / '1'} is the newest complete checkpoint" in line
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]


MAIN_ERRORS = {  # case: (overrides or other arguments, the error line)
    "unknown_key": (
        {"log_every_step": 3},
        "error: unknown config key --config.log_every_step (did you mean " "'log_every_steps'?)",
    ),
    "missing_config_file": (
        "--config=configs/no_such_file.py",
        f"error: config file {th.REPO}/configs/" "no_such_file.py does not exist",
    ),
    "log_every_steps_0": ({"log_every_steps": 0}, "error: config.log_every_steps=0 must be > 0"),
    "batch_size_0": ({"batch_size": 0}, "error: config.batch_size=0 must be > 0"),
    "checkpoint_every_steps_0": ({"checkpoint_every_steps": 0}, "error: config.checkpoint_every_steps=0 must be > 0"),
    "negative_lr": ({"optim.transformer.lr": -0.001}, "error: config.optim.transformer.lr=-0.001 must be >= 0"),
    "total_steps_0": ({"total_steps": 0}, "error: config.total_steps=0 must be -1 (use num_epochs) or > 0"),
    "keep_checkpoints_0": ({"keep_checkpoints": 0}, "error: config.keep_checkpoints=0 must be >= 1"),
    "workdir_is_a_file": ("WORKDIR_FILE", "error: --workdir {workdir} is a file, not a folder"),
}


@pytest.fixture(scope="module")
def main_errors(data_dir, tmp_path_factory):
  """Every case of MAIN_ERRORS as its own `python -m pixelbert_jax.main`, all started together (each stops
  before JAX starts, so the 2 cores run their imports side by side)."""
  procs = {}
  for case, (given, _) in MAIN_ERRORS.items():
    workdir = tmp_path_factory.mktemp(case) / "run"
    overrides = th.tiny_overrides(data_dir, total_steps=2)
    command = th.main_command(str(workdir), {**overrides, **(given if isinstance(given, dict) else {})})
    if given == "WORKDIR_FILE":
      workdir.write_text("not a folder")
    elif isinstance(given, str):
      command[3] = given
    procs[case] = (
        workdir,
        subprocess.Popen(command, cwd=th.REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    )
  results = {case: (workdir, proc.communicate(timeout=600), proc.returncode) for case, (workdir, proc) in procs.items()}
  for workdir, (out, err), rc in results.values():
    if rc == 0 and workdir.is_dir():
      shutil.rmtree(workdir)  # the old code trained: keep the temporary space small
  return results


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MAIN_ERRORS))
def test_main_ends_bad_input_with_one_error_line(main_errors, case):
  workdir, (_, err), rc = main_errors[case]
  assert rc == 2, err[-3000:]
  expected = MAIN_ERRORS[case][1].format(workdir=workdir)
  assert _one_error_line(err).startswith(expected), err[-3000:]
  if case != "workdir_is_a_file":
    assert not workdir.exists(), "nothing may be written before the config is checked"


@pytest.mark.slow
def test_predict_given_a_file_as_checkpoint_is_one_line(reference, image, capsys):
  rc = predict.main(["--checkpoint", str(reference / "config.json"), "--image", str(image), "--caption", "a star"])
  err = capsys.readouterr().err
  assert rc == 2 and _one_error_line(err) == (
      f"error: Checkpoint path {reference / 'config.json'} is a file; "
      "expected a workdir, its checkpoints/ folder or a step folder"
  )


@pytest.mark.slow
def test_convert_to_torch_without_torch_is_one_line_before_any_output(reference, tmp_path, capsys, monkeypatch):
  from pixelbert_jax.convert.__main__ import main as convert_main

  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  out = tmp_path / "out"
  rc = convert_main(["to-torch", "--checkpoint", str(reference), "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 1 and _one_error_line(err).startswith("error: torch is not installed"), err
  assert "--no-verify" in err and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("state", ["missing", "empty"])
def test_prepare_without_manual_dir_files_is_one_line(tmp_path, capsys, state):
  from pixelbert_jax.data import prepare

  manual = tmp_path / "downloads"
  if state == "empty":
    manual.mkdir()
  rc = prepare.main(["--dataset", "coco_karpathy", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "tfds")])
  err = capsys.readouterr().err
  word = "does not exist" if state == "missing" else "is empty"
  assert rc == 1 and _one_error_line(err) == (
      f"error: --manual_dir {manual} {word}: put the downloaded "
      "coco_karpathy files there (which ones: docs/real_datasets.md)"
  )


def test_a_caption_longer_than_max_text_len_is_cut_with_one_warning(tmp_path, caplog):
  from pixelbert_jax.data import text

  tok = text.load_tokenizer(text.write_world_vocab(str(tmp_path), ["red", "star"]))
  text._truncated["count"] = 0
  with caplog.at_level(logging.WARNING):
    ids, mask, _ = text.encode(tok, " ".join(["red star"] * 2500), 40)
    for _ in range(5):
      text.encode(tok, " ".join(["red star"] * 2500), 40)
    text.encode(tok, "red star", 40)
  assert mask.sum() == 40
  warnings = [r.getMessage() for r in caplog.records if "max_text_len" in r.getMessage()]
  assert warnings == [
      "A text of 5002 tokens was cut to max_text_len=40 (1 text cut so far; raise "
      "config.data.max_text_len to keep more of them)."
  ]
