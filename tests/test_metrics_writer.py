import json

import pytest

from pixelbert_jax import metrics_writer
from tests import train_helpers as th


def test_jsonl_appends_across_writers_and_skips_non_finite_in_tensorboard(tmp_path):
  w = metrics_writer.MetricWriter(tmp_path, enabled=True)
  w.write(1, {"train/loss": 2.5})
  w.close()
  w = metrics_writer.MetricWriter(tmp_path, enabled=True)  # a resumed run appends
  w.write(2, {"train/loss": float("nan"), "eval/acc": 0.5})
  w.close()
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[0] == {"step": 1, "train/loss": 2.5}
  assert rows[1]["step"] == 2 and rows[1]["eval/acc"] == 0.5
  assert list((tmp_path / "tensorboard").iterdir())


def test_disabled_writer_writes_nothing(tmp_path):
  w = metrics_writer.MetricWriter(tmp_path / "w", enabled=False)
  w.write(1, {"a": 1.0})
  w.close()
  assert not (tmp_path / "w").exists()


def test_progress_line_has_what_a_person_follows():
  p = metrics_writer.ProgressLine(total_steps=100, start_step=0)
  line = p.format(
      10,
      {
          "train/loss": 1.23456,
          "train/mlm_acc": 0.5,
          "train/itm_acc": 0.75,
          "train/lr": 1e-4,
          "perf/examples_per_s": 12.3,
      },
  )
  for part in ("step 10/100", "loss 1.2346", "mlm_acc 0.500", "itm_acc 0.750", "lr 1.00e-04", "12.3 ex/s", "ETA"):
    assert part in line


def test_has_row_knows_the_rows_kept_at_resume_and_those_written_since(tmp_path):
  w = metrics_writer.MetricWriter(tmp_path, enabled=True)
  w.write(2, {"train/loss": 1.0})
  w.write(2, {"eval/acc": 0.5})
  w.write(4, {"train/loss": 1.0})
  w.close()
  w = metrics_writer.MetricWriter(tmp_path, enabled=True, resume_step=2)
  assert w.has_row(2, "eval/") and w.has_row(2, "train/") and not w.has_row(4, "train/")
  assert metrics_writer.has_row(tmp_path, 2, "eval/") and not metrics_writer.has_row(tmp_path, 4, "eval/")
  w.write(4, {"eval/acc": 0.7})
  assert w.has_row(4, "eval/")
  w.close()


def test_a_row_in_metrics_jsonl_means_tensorboard_has_it(tmp_path, monkeypatch):
  """A resumed run reruns an evaluation whose row is missing from metrics.jsonl: so the row is written last,
  and a crash while TensorBoard is written leaves no row (before, the row was first and TensorBoard lost it)."""
  w = metrics_writer.MetricWriter(tmp_path, enabled=True)

  def crash(*args, **kwargs):
    raise OSError("killed")

  monkeypatch.setattr(w._tb, "add_scalar", crash)
  with pytest.raises(OSError):
    w.write(4, {"eval/acc": 0.5})
  w.close()
  assert not (tmp_path / "metrics.jsonl").read_text()


def test_a_resumed_writer_hides_tensorboard_events_after_the_resume_step(tmp_path):
  """Events after the checkpoint a run resumes from are hidden even when metrics.jsonl has no row to drop
  (a run killed after TensorBoard had a row and before metrics.jsonl did): TensorBoard shows each step once."""
  w = metrics_writer.MetricWriter(tmp_path, enabled=True)
  for step in (1, 2, 3):
    w.write(step, {"train/loss": float(step)})
  w.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # step 3 reached TensorBoard only
  w = metrics_writer.MetricWriter(tmp_path, enabled=True, resume_step=2)
  w.write(3, {"train/loss": 30.0})
  w.close()
  assert th.tensorboard_scalars(tmp_path) == [("train/loss", 1, 1.0), ("train/loss", 2, 2.0), ("train/loss", 3, 30.0)]
