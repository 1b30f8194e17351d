"""bench/grounding_speed.py, the demo's grounding probe: its per-cell labels match the scenes, and both
stages (the backbone control and the probe) run and report finite losses."""
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import grounding_speed  # noqa: E402
from pixelbert_jax.data import synthetic  # noqa: E402


def test_cell_labels_name_each_object():
  images, captions, cells = grounding_speed.scenes(6, 0, 192)
  assert images.shape == (6, 192, 192, 3) and len(captions) == 6 and cells.shape == (6, 9, 2)
  for k in range(6):  # scenes() keeps every scene when objects=0, so row k is scene k
    objs = synthetic.make_scene(0, "train", k, 192)
    expected = np.full((9, 2), 8)
    for o in objs:
      expected[o.cell[0] * 3 + o.cell[1]] = (list(synthetic.COLOURS).index(o.colour),
                                             synthetic.SHAPES.index(o.shape))
    np.testing.assert_array_equal(cells[k], expected)


def test_probe_runs_with_backbone_control(capsys):
  grounding_speed.main(["--steps", "2", "--batch", "2", "--images", "4", "--backbone_steps", "2",
                        "--log_every", "1", "--cnn_lr", "0", "--set", "model.num_layers=1"])
  out = capsys.readouterr().out
  backbone = re.findall(r"backbone\s+\d+\s+loss ([\d.naif]+)", out)
  probe = re.findall(r"step\s+\d+\s+loss ([\d.naif]+)", out)
  assert len(backbone) == 2 and len(probe) == 2, out
  assert all(math.isfinite(float(x)) for x in backbone + probe), out
