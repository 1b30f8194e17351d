import json

from pixelbert_jax import metrics_writer


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
