"""config.profile_steps: a jax.profiler trace of the chosen steps in WORKDIR/profile, read back on CPU."""

from __future__ import annotations

import json

import jax
import pytest

from pixelbert_jax import profiling, train
from tests import train_helpers as th


def _events(path) -> list:
  data = jax.profiler.ProfileData.from_serialized_xspace(path.read_bytes())
  return [e for plane in data.planes for line in plane.lines for e in line.events]


def _traced_steps(path) -> set[int]:
  """The step numbers of the trace's StepTraceAnnotation events."""
  return {int(dict(e.stats)["step_num"]) for e in _events(path) if e.name == "train" and "step_num" in dict(e.stats)}


@pytest.mark.slow
def test_profile_steps_traces_those_steps_only(data_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  config = th.tiny_config(data_dir, total_steps=4, profile_steps=2, profile_start_step=2)
  train.train_and_evaluate(config, str(workdir))
  files = list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(files) == 1 and files[0].stat().st_size > 0, files
  assert _traced_steps(files[0]) == {2, 3}
  python_calls = [e.name for e in _events(files[0]) if e.name.startswith("$")]  # JAX's Python tracer's events
  assert not python_calls, python_calls[:5]
  ops = profiling.op_times(files[0])
  assert ops and all(s >= 0 for s in ops.values()) and sum(ops.values()) > 0

  # The command reads it back: the top operations, their shares of the traced operations' time.
  capsys.readouterr()  # what training printed
  assert profiling.main([str(workdir), "--top", "3"]) == 0
  top = json.loads(capsys.readouterr().out)
  assert top["trace"] == [str(files[0])] and len(top["top"]) == 3
  assert top["top"][0]["seconds"] >= top["top"][-1]["seconds"] and 0 < sum(r["share"] for r in top["top"]) <= 1
  assert list(top["steps"]) == ["2", "3"] and all(s > 0 for s in top["steps"].values())
  assert top["by_kind"][0]["seconds"] >= top["top"][0]["seconds"]  # a kind sums its operations

  # A resumed run past the window traces nothing more.
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=6, profile_steps=2, profile_start_step=2), str(workdir))
  assert list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb")) == files


@pytest.mark.slow
def test_no_profile_by_default(tiny_pretrained):
  assert not (tiny_pretrained / "profile").exists()


def test_a_workdir_without_a_trace_is_one_line(tmp_path, capsys):
  assert profiling.main([str(tmp_path)]) == 2
  assert capsys.readouterr().err == f"error: no *.xplane.pb under {tmp_path} (train with --config.profile_steps=N)\n"
