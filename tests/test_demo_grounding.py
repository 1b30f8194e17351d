"""demo/grounding.py: the share on the named object from hand-built attention, the objects' feature pixels
from the world's ground truth, the check on a tiny checkpoint agreeing with the pictures' maps, and its
command's one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from pixelbert_jax import attention, predict
from pixelbert_jax.data import builders
from pixelbert_jax.data import synthetic as world
from pixelbert_jax.demo import grounding
from tests.test_visualize import _hand_built


def test_share_on_a_hand_built_matrix():
  to_pixels = attention.word_to_pixels(_hand_built(), [2], pixel_offset=4)
  np.testing.assert_allclose(to_pixels.sum(), 0.8, rtol=1e-6)
  on_object, valid = np.zeros(9, bool), np.ones(9, bool)
  on_object[4] = True
  # 0.4 of the 0.8 the word puts on pixels: 0.5, whatever goes to the text.
  np.testing.assert_allclose(grounding.object_share(to_pixels, on_object, valid), 0.5, rtol=1e-6)
  on_object[[0, 1]] = True
  np.testing.assert_allclose(grounding.object_share(to_pixels, on_object, valid), 0.55 / 0.8, rtol=1e-6)
  # Padding pixels are out of both sums: 8 (0.1) padding -> 0.55 / 0.7.
  valid[8] = False
  np.testing.assert_allclose(grounding.object_share(to_pixels, on_object, valid), 0.55 / 0.7, rtol=1e-6)
  # An object on pixels the word ignores gets 0; a word with no pixel attention gets nan, not a crash.
  np.testing.assert_allclose(grounding.object_share(to_pixels, np.eye(9, dtype=bool)[6], np.ones(9, bool)), 0.0)
  assert np.isnan(grounding.object_share(np.zeros(9), on_object, np.ones(9, bool)))
  # Batched: one share per row.
  both = grounding.object_share(np.stack([to_pixels, to_pixels]), np.eye(9, dtype=bool)[[4, 6]], np.ones((2, 9), bool))
  np.testing.assert_allclose(both, [0.5, 0.0], rtol=1e-6)


def test_object_pixels_from_the_worlds_ground_truth():
  spec = world.SceneSpec(1, 1, 0.3, 0.45)
  for index in range(20):
    (obj,) = world.make_scene(0, "val", index, 192, spec)
    cells = grounding.object_pixels(obj, 1.0, (3, 3))
    assert np.flatnonzero(cells).tolist() == [obj.cell[0] * 3 + obj.cell[1]], obj
  # An object across a cell border covers both feature pixels (a world with other sizes).
  obj = world.Obj("red", "star", "large", (0, 0), center=(64.0, 30.0), radius=10.0)
  assert np.flatnonzero(grounding.object_pixels(obj, 1.0, (3, 3))).tolist() == [0, 1]
  # At scale 2: x 108..148 (columns 1, 2), y 40..80 (rows 0, 1) of a 6x6 grid.
  assert np.flatnonzero(grounding.object_pixels(obj, 2.0, (6, 6))).tolist() == [1, 2, 7, 8]


# -- on a checkpoint -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def maps(tiny_pretrained):
  """One AttentionMaps for the module: its runner compiles once."""
  return attention.AttentionMaps(str(tiny_pretrained))


@pytest.mark.slow
def test_grounding_check_on_the_tiny_checkpoint(maps):
  report = grounding.grounding_check(maps, num_images=3, captions_per_image=2)
  # demo_hard scenes have 1-3 objects, one cell each: the other words' control is against all of them.
  share = report["object_pixel_share"]
  assert share["colour"] == pytest.approx(1 / 9) and share["shape"] == pytest.approx(1 / 9)
  assert 1 / 9 <= share["other"] <= 3 / 9
  assert report["words"]["colour"] == report["words"]["shape"] > 0 and report["words"]["other"] > 0
  assert set(report["variants"]) == {"as written", "masked"}
  modes = report["variants"]["as written"]
  assert list(modes)[0] == report["default_mode"] == "layer 1, mean over heads"
  assert len(modes) == 2 + 2 + 2 * 2  # head means, rollouts, heads
  for entry in modes.values():
    for kind in ("colour", "shape"):
      assert 0.0 <= entry[kind]["share"] <= 1.0
      assert entry[kind]["ratio"] == pytest.approx(entry[kind]["share"] * 9)
  assert "other" not in report["variants"]["masked"][report["default_mode"]]  # only grounded words are masked
  assert "| layer 1, mean over heads (default) |" in grounding.grounding_table(report)
  with pytest.raises(predict.PredictError, match=r"--num_images must be in 1\.\.16"):
    grounding.grounding_check(maps, num_images=17)


def test_grounding_check_agrees_with_the_pictures_maps(maps, tmp_path):
  """The check's share for one scene and caption equals the share computed from `AttentionMaps.maps` on the
  dataset's JPEG of that scene and the world's ground truth."""
  data_cfg = maps.predictor.data_cfg
  s = data_cfg.synthetic
  objs = world.make_scene(int(s.seed), "val", 0, int(s.image_size), builders.scene_spec(data_cfg))
  path = tmp_path / "scene.jpg"
  path.write_bytes(world.encode_jpeg(world.render(int(s.seed), "val", 0, objs, int(s.image_size))))
  caption = world.captions(int(s.seed), "val", 0, objs, 1)[0][0]
  report = grounding.grounding_check(maps, num_images=1, captions_per_image=1)
  for kind, names in (("colour", world.COLOURS), ("shape", world.SHAPES)):
    words = [w for w in caption.split() if w in names]
    got = maps.maps(str(path), caption, words=words, use_rollout=True)
    shares = [
        grounding.object_share(m.reshape(-1), grounding.object_pixels(o, 1.0, (3, 3)), np.ones(9, bool))
        for w, m in zip(got["words"], got["maps"])
        for o in objs
        if w in (o.colour, o.shape)
    ]
    assert len(shares) == len(words) > 0
    np.testing.assert_allclose(
        report["variants"]["as written"]["rollout through layer 1"][kind]["share"], np.mean(shares), rtol=1e-4
    )


def test_binding_ratio_agrees_with_the_pictures_maps(maps, tmp_path):
  """The binding columns: per feature pixel, the mean share on the named object over the mean share on the
  image's other objects, over the colour and shape words of the first caption of the first scenes, from
  `AttentionMaps.maps` (rollout) and the world's ground truth; one-object scenes count for nothing."""
  data_cfg = maps.predictor.data_cfg
  s = data_cfg.synthetic
  num_images, seen_multi = 4, 0
  named, others = {"colour": [], "shape": []}, {"colour": [], "shape": []}
  for i in range(num_images):
    objs = world.make_scene(int(s.seed), "val", i, int(s.image_size), builders.scene_spec(data_cfg))
    path = tmp_path / f"scene{i}.jpg"
    path.write_bytes(world.encode_jpeg(world.render(int(s.seed), "val", i, objs, int(s.image_size))))
    caption = world.captions(int(s.seed), "val", i, objs, 1)[0][0]
    if len(objs) < 2:
      continue
    seen_multi += 1
    cells = [grounding.object_pixels(o, 1.0, (3, 3)) for o in objs]
    for kind, names in (("colour", world.COLOURS), ("shape", world.SHAPES)):
      words = [w for w in caption.split() if w in names]
      got = maps.maps(str(path), caption, words=words, use_rollout=True)
      for w, m in zip(got["words"], got["maps"]):
        k = next(k for k, o in enumerate(objs) if w in (o.colour, o.shape))
        rest = np.any([c for j, c in enumerate(cells) if j != k], axis=0)
        share = lambda px: grounding.object_share(m.reshape(-1), px, np.ones(9, bool)) / px.sum()
        named[kind].append(share(cells[k]))
        others[kind].append(share(rest))
  assert seen_multi > 0  # demo_hard scenes: 1-3 objects
  report = grounding.grounding_check(maps, num_images=num_images, captions_per_image=1)
  for kind in ("colour", "shape"):
    entry = report["binding"]["as written"]["rollout through layer 1"][kind]
    np.testing.assert_allclose(entry["named"], np.mean(named[kind]), rtol=1e-4)
    np.testing.assert_allclose(entry["ratio"], np.mean(named[kind]) / np.mean(others[kind]), rtol=1e-4)
  assert "Binding, on the images with more than one object" in grounding.grounding_table(report)


@pytest.mark.slow
def test_cli_prints_the_table_and_errors_are_one_line(tiny_pretrained, tmp_path, capsys):
  rc = grounding.main(["--checkpoint", str(tiny_pretrained), "--num_images", "0"])
  out, err = capsys.readouterr()
  assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
  assert err.startswith("error: --num_images must be in 1..16"), err
  rc = grounding.main(
      ["--checkpoint", str(tiny_pretrained), "--num_images", "1", "--captions_per_image", "1", "--out", str(tmp_path)]
  )
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert "| layer 1, mean over heads (default) |" in out
  assert (tmp_path / "grounding.json").exists()
