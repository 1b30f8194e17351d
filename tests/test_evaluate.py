"""pixelbert_jax.evaluate's one-line errors (its runs: tests/test_vqa_answer_counts.py, test_own_data_guide.py)."""

from __future__ import annotations

import json

from pixelbert_jax import evaluate


def _error(capsys, argv) -> str:
  assert evaluate.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err, err
  return err


def test_missing_workdir_and_workdir_without_config(tmp_path, capsys):
  assert str(tmp_path / "nope") in _error(capsys, ["--checkpoint", str(tmp_path / "nope")])
  (tmp_path / "run" / "checkpoints" / "2" / "params").mkdir(parents=True)
  assert "no config.json" in _error(capsys, ["--checkpoint", str(tmp_path / "run")])


def test_the_run_config_comes_back_with_its_tuples(tmp_path):
  """config.json has lists where the config had tuples (buckets are hashed, the mesh shape compared)."""
  (tmp_path / "run" / "checkpoints" / "2" / "params").mkdir(parents=True)
  (tmp_path / "run" / "config.json").write_text(
      json.dumps({"task": "vqa", "mesh_shape": [-1, 1, 1], "data": {"buckets": [[64, 64]], "eval_split": "val"}})
  )
  config, workdir = evaluate.load_run_config(str(tmp_path / "run" / "checkpoints"))
  assert workdir == str(tmp_path / "run") and config.data.buckets == ((64, 64),) and config.mesh_shape == (-1, 1, 1)


def test_other_failures_are_one_line_with_status_1_and_the_traceback_with_verbose(tmp_path, monkeypatch, capsys):
  """evaluate ends like the other commands (cli_errors.run_command): a failure that is not bad input is an
  `error:` line naming its type (the message's further lines indented below it), exit status 1, where it used
  to end in a Python traceback; --verbose adds the traceback."""

  def broken(checkpoint, split=None, step=None):
    raise RuntimeError("XLA failed\n  a long quoted traceback")

  monkeypatch.setattr(evaluate, "evaluate", broken)
  assert evaluate.main(["--checkpoint", str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.splitlines() == ["error: RuntimeError: XLA failed", "  a long quoted traceback"], err
  assert evaluate.main(["--checkpoint", str(tmp_path), "--verbose"]) == 1
  err = capsys.readouterr().err
  assert "Traceback (most recent call last)" in err and "\nerror: RuntimeError: XLA failed\n" in err


def test_the_metrics_are_printed_as_json_sorted_by_key(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(
      evaluate, "evaluate", lambda checkpoint, split=None, step=None: {"step": 2, "eval/b": 0.5, "eval/a": 1.0}
  )
  assert evaluate.main(["--checkpoint", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert list(json.loads(out)) == ["eval/a", "eval/b", "step"] and out.startswith("{\n  ")


def test_bad_input_with_an_empty_message_is_still_one_line(tmp_path, monkeypatch, capsys):
  """Its own tail cut the message with str(e).splitlines()[0], which raised IndexError on an empty one."""

  def refused(checkpoint, split=None, step=None):
    raise evaluate.EvaluateError("")

  monkeypatch.setattr(evaluate, "evaluate", refused)
  assert _error(capsys, ["--checkpoint", str(tmp_path)]) == "error: EvaluateError"
