"""plot: a PNG from a small hand-written metrics.jsonl, the panels metrics go to, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pixelbert_jax import plot
from tests import train_helpers as th

LINES = [
    {"step": 0, "warm_start/loss": 0.02, "warm_start/colour_acc": 1.0, "warm_start/shape_acc": 0.95},
    *(
        {
            "step": s,
            "train/loss": 6.0 / (1 + s / 10),
            "train/mlm_acc": s / 40,
            "train/mlm_acc_grounded": s / 50,
            "train/itm_acc": 0.5 + s / 100,
            "train/lr": 1e-4 * min(1.0, (s + 1) / 10),
            "train/grad_norm": 3.0,
            "perf/examples_per_s": 170.0,
        }
        for s in range(0, 41, 10)
    ),
    {
        "step": 20,
        "eval/loss": 1.5,
        "eval/itm_acc": 0.7,
        "eval/mlm_acc_grounded": 0.4,
        "eval/mlm_acc_grounded_shuffled": 0.12,
        "eval/mlm_grounded_majority_rate": 0.09,
    },
    {
        "step": 40,
        "eval/loss": 0.9,
        "eval/itm_acc": 0.9,
        "eval/mlm_acc_grounded": 0.85,
        "eval/mlm_acc_grounded_shuffled": 0.11,
        "eval/mlm_grounded_majority_rate": 0.09,
        "eval/num_images": 500,
    },
]


def _write(workdir, lines, extra: str = ""):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + extra)
  return workdir


def test_plot_writes_one_png_with_every_panel(tmp_path):
  wd = _write(tmp_path / "run", LINES, extra='{"step": 50, "train/lo')  # a line half written by a running job
  out = tmp_path / "figs" / "curves.png"
  result = plot.plot(str(wd), str(out))
  assert result["skipped_lines"] == 1
  assert result["panels"] == [t for t, _ in plot.PANELS]
  assert "perf/examples_per_s" not in result["metrics"] and "eval/mlm_acc_grounded_shuffled" in result["metrics"]
  with Image.open(out) as img:
    assert img.format == "PNG" and img.width == 2 * plot.PANEL_W and img.height > 4 * plot.PANEL_H
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
  # Something is drawn in each of the first colours (lines, dots, legend), not just axes.
  for colour in plot.PALETTE[:4]:
    assert (pixels == colour).all(axis=1).sum() > 50, colour


def test_metrics_go_to_their_panels():
  series = {
      k: [(0, 0.5)]
      for k in [
          "train/loss",
          "eval/itm_loss",
          "eval/mlm_acc_grounded",
          "eval/mlm_acc_grounded_shuffled",
          "train/mlm_acc_grounded",
          "train/itm_acc",
          "eval/vqa_score",
          "warm_start/loss",
          "train/lr",
          "train/grad_norm",
          "perf/step_time_s",
      ]
  }
  series["eval/num_images"] = [(0, 500.0)]
  panels = dict(plot.group(series))
  assert sorted(panels["losses"]) == ["eval/itm_loss", "train/loss"]
  assert sorted(panels[plot.PANELS[1][0]]) == [
      "eval/mlm_acc_grounded",
      "eval/mlm_acc_grounded_shuffled",
      "train/mlm_acc_grounded",
  ]
  assert sorted(panels["training accuracies"]) == ["train/itm_acc"]
  assert sorted(panels["eval metrics"]) == ["eval/vqa_score"]
  assert sorted(panels["CNN warm start"]) == ["warm_start/loss"]
  assert sorted(panels["other"]) == ["eval/num_images", "train/grad_norm"]  # not in [0, 1]; perf/* left out


def test_read_metrics_keeps_the_last_value_of_a_step(tmp_path):
  wd = _write(
      tmp_path,
      [
          {"step": 10, "train/loss": 2.0},
          {"step": 5, "train/loss": 3.0},
          {"step": 10, "train/loss": 1.0, "train/x": float("nan"), "note": "text"},
      ],
  )
  series, bad = plot.read_metrics(wd / "metrics.jsonl")
  assert series == {"train/loss": [(5, 3.0), (10, 1.0)]} and bad == 0


def test_nice_ticks():
  assert plot.nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
  assert plot.nice_ticks(0.08, 0.96) == pytest.approx([0.2, 0.4, 0.6, 0.8])
  assert plot.nice_ticks(0, 1000, 6) == pytest.approx([0, 200, 400, 600, 800, 1000])
  assert plot.log_ticks(-4.0, -2.0) == pytest.approx(
      [-4, -4 + np.log10(2), -4 + np.log10(5), -3, -3 + np.log10(2), -3 + np.log10(5), -2]
  )


@pytest.mark.slow
def test_errors_are_one_line(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  _write(tmp_path / "blank", [], extra="\n")
  cases = [
      (tmp_path / "nowhere", f"error: workdir {tmp_path / 'nowhere'} does not exist"),
      (tmp_path / "empty", f"error: no metrics.jsonl in {tmp_path / 'empty'}"),
      (tmp_path / "blank", f"error: {tmp_path / 'blank' / 'metrics.jsonl'} holds no metrics"),
  ]
  for wd, start in cases:
    rc = plot.main(["--workdir", str(wd), "--out", str(tmp_path / "c.png")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith(start), err
  assert not (tmp_path / "c.png").exists()


@pytest.mark.slow
def test_cli(tmp_path):
  wd = _write(tmp_path / "run", LINES)
  proc = subprocess.run(
      [sys.executable, "-m", "pixelbert_jax.plot", "--workdir", str(wd), "--out", str(tmp_path / "c.png")],
      cwd=th.REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["out"] == str(tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 10_000
