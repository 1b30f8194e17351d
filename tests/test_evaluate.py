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
