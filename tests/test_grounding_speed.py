"""bench/grounding_speed.py, the demo's grounding probe: its per-cell labels match the scenes, and both
stages (the backbone control and the probe) run and report finite losses."""

import math
import re

import numpy as np
import pytest

from bench import grounding_speed
from pixelbert_jax.data import synthetic


def test_cell_labels_name_each_object():
  """Labels checked against the rendered pixels: the cell that holds an object's centre pixel carries the
  colour drawn there, and every other cell is empty."""
  images, captions, cells = grounding_speed.scenes(6, 0, 192)
  assert images.shape == (6, 192, 192, 3) and len(captions) == 6 and cells.shape == (6, 9, 2)
  rgb = np.array(list(synthetic.COLOURS.values()))
  for k in range(6):  # scenes() keeps every scene when objects=0, so row k is scene k
    objs = synthetic.make_scene(0, "train", k, 192)
    occupied = set()
    for o in objs:
      x, y = int(o.center[0]), int(o.center[1])
      cell = (y // 64) * 3 + x // 64
      occupied.add(cell)
      if o.shape != "ring":  # a ring's centre is background
        drawn = int(np.argmin(np.abs(rgb - images[k, y, x].astype(int)).sum(-1)))
        assert cells[k, cell, 0] == drawn, (k, o)
      assert synthetic.SHAPES[cells[k, cell, 1]] == o.shape, (k, o)
    empty = [c for c in range(9) if c not in occupied]
    assert (cells[k, empty] == 8).all(), (k, cells[k])


@pytest.mark.slow
def test_probe_runs_with_backbone_control(capsys):
  grounding_speed.main(
      [
          "--steps",
          "2",
          "--batch",
          "2",
          "--images",
          "4",
          "--backbone_steps",
          "2",
          "--log_every",
          "1",
          "--cnn_lr",
          "0",
          "--set",
          "model.num_layers=1",
      ]
  )
  out = capsys.readouterr().out
  backbone = re.findall(r"backbone\s+\d+\s+loss ([\d.naif]+)", out)
  probe = re.findall(r"step\s+\d+\s+loss ([\d.naif]+)", out)
  assert len(backbone) == 2 and len(probe) == 2, out
  assert all(math.isfinite(float(x)) for x in backbone + probe), out


@pytest.mark.slow
def test_cached_features_probe_reports_held_out_accuracy(capsys):
  grounding_speed.main(
      [
          "--steps",
          "2",
          "--batch",
          "2",
          "--images",
          "4",
          "--cnn_lr",
          "0",
          "--cache_features",
          "--eval_images",
          "3",
          "--log_every",
          "1",
          "--set",
          "model.num_layers=1",
      ]
  )
  out = capsys.readouterr().out
  held = [float(x) for x in re.findall(r"held-out ([\d.]+)", out)]
  assert len(held) == 2 and all(0.0 <= h <= 1.0 for h in held), out
  probe = re.findall(r"step\s+\d+\s+loss ([\d.naif]+)", out)
  assert all(math.isfinite(float(x)) for x in probe), out


@pytest.mark.slow
def test_cached_features_need_a_frozen_cnn():
  with pytest.raises(SystemExit):
    grounding_speed.main(["--steps", "1", "--cache_features", "--cnn_lr", "1e-3"])
