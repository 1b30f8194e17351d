"""The README's first training command, parsed out of README.md and run as written from a fresh directory.

A user runs it from the repository root with a relative `--workdir`; here the root is a temporary folder that
holds links to the repo's `pixelbert_jax/` and `configs/` (what the command reads), so the workdir lands in it.
Appended `--config.X=Y` overrides only shrink the world, the model and the step counts; the run still passes
a checkpoint and an evaluation. Running the same command again on the finished workdir must not crash, and
must report the finished run without training again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests import train_helpers as th

TOTAL_STEPS = 4


def readme_command() -> list[str]:
  """argv of the `python -m pixelbert_jax.main ...` part of README.md's first line naming pixelbert_jax.main."""
  readme = th.REPO / "README.md"
  for line in readme.read_text().splitlines():
    if "pixelbert_jax.main" in line:
      match = re.search(r"python3? -m pixelbert_jax\.main[^`&|;]*", line)
      if match is None:
        break
      return shlex.split(match.group(0))
  pytest.fail(
      f"{readme}: no line with a `python -m pixelbert_jax.main ...` command; this test runs the "
      "README's first training command verbatim, so update it with the README"
  )


def test_readme_command_parses():
  argv = readme_command()
  assert argv[:3] in (["python", "-m", "pixelbert_jax.main"], ["python3", "-m", "pixelbert_jax.main"]), argv
  assert any(a.startswith("--config=") for a in argv) and any(a.startswith("--workdir=") for a in argv), argv


@pytest.mark.slow
def test_readme_command_runs_then_reruns_on_the_finished_workdir(data_dir, tmp_path):
  argv = readme_command()
  workdir = next(a for a in argv if a.startswith("--workdir=")).split("=", 1)[1]
  assert not os.path.isabs(workdir), "the README's workdir is relative: that is what this test is about"
  root = tmp_path / "clone"
  root.mkdir()
  for name in ("pixelbert_jax", "configs"):
    (root / name).symlink_to(th.REPO / name)
  overrides = {
      **th.tiny_overrides(data_dir, total_steps=TOTAL_STEPS),
      "cnn_warm_start.steps": 2,
      "checkpoint_every_steps": TOTAL_STEPS,
  }
  overrides.pop("cpu_devices")  # keep the demo's own device setting: the command as the user runs it
  # `python` is whatever the user's venv provides: here, this interpreter.
  cmd = [sys.executable] + argv[1:] + [f"--config.{k}={v}" for k, v in overrides.items()]
  # HOME in tmp: the config's default data_dir (~/tensorflow_datasets) gets the vocab before the override.
  env = {**os.environ, "HOME": str(tmp_path / "home")}
  env.pop("PYTHONPATH", None)  # the package comes from the clone's folder, as for the user

  first = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  run = root / workdir
  assert (run / "checkpoints" / str(TOTAL_STEPS)).is_dir(), first.stderr[-3000:]
  rows = th.metrics(run)
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == list(range(1, TOTAL_STEPS + 1))
  evals = [r for r in rows if "eval/itm_acc" in r]
  assert evals and evals[-1]["step"] == TOTAL_STEPS
  assert json.loads((run / "config.json").read_text())["data"]["data_dir"] == data_dir

  again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (
      f"Run already finished: {run / 'checkpoints'} holds step {TOTAL_STEPS} of {TOTAL_STEPS}" in again.stderr
  ), again.stderr[-3000:]
  assert th.metrics(run) == rows, "the rerun of a finished run must not train or evaluate again"
