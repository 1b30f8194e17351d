"""visualize: the attention share on hand-built matrices, word pieces, rollout, the sown attention leaving the
model unchanged, every task's and a real-size model's maps, the pictures' aspect ratio, one-line CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pixelbert_jax import predict, visualize
from pixelbert_jax.data import synthetic as world
from pixelbert_jax.data import text as text_lib
from pixelbert_jax.models.build import build_model, init_variables
from pixelbert_jax.models.presets import model_config
from tests import train_helpers as th

# -- the share, on hand-built attention ----------------------------------------------------------------------------


def _hand_built(text_len: int = 4, pixels: int = 9) -> np.ndarray:
  """[T, T] attention, T = text_len + pixels: row 2 (the word) puts 0.2 on text, and on the pixels 0.4 on
  pixel 4, 0.1 on pixels 0 and 8, 0.05 on pixels 1-4 ... (see below); other rows uniform."""
  t = text_len + pixels
  m = np.full((t, t), 1.0 / t, np.float32)
  row = np.zeros(t, np.float32)
  row[:text_len] = 0.05  # 0.2 on the text
  pix = np.zeros(pixels, np.float32)
  pix[4], pix[0], pix[8] = 0.4, 0.1, 0.1
  pix[[1, 2, 3, 5]] = 0.05  # 0.2 over four pixels; 6 and 7 get nothing
  row[text_len:] = pix
  m[2] = row
  return m


def test_share_on_a_hand_built_matrix():
  m = _hand_built()
  to_pixels = visualize.word_to_pixels(m, [2], pixel_offset=4)
  np.testing.assert_allclose(to_pixels.sum(), 0.8, rtol=1e-6)
  on_object, valid = np.zeros(9, bool), np.ones(9, bool)
  on_object[4] = True
  # 0.4 of the 0.8 the word puts on pixels: 0.5, whatever goes to the text.
  np.testing.assert_allclose(visualize.object_share(to_pixels, on_object, valid), 0.5, rtol=1e-6)
  on_object[[0, 1]] = True
  np.testing.assert_allclose(visualize.object_share(to_pixels, on_object, valid), 0.55 / 0.8, rtol=1e-6)
  # Padding pixels are out of both sums: 8 (0.1) padding -> 0.55 / 0.7.
  valid[8] = False
  np.testing.assert_allclose(visualize.object_share(to_pixels, on_object, valid), 0.55 / 0.7, rtol=1e-6)
  # An object on pixels the word ignores gets 0; a word with no pixel attention gets nan, not a crash.
  np.testing.assert_allclose(visualize.object_share(to_pixels, np.eye(9, dtype=bool)[6], np.ones(9, bool)), 0.0)
  assert np.isnan(visualize.object_share(np.zeros(9), on_object, np.ones(9, bool)))
  # Batched: one share per row.
  both = visualize.object_share(np.stack([to_pixels, to_pixels]), np.eye(9, dtype=bool)[[4, 6]], np.ones((2, 9), bool))
  np.testing.assert_allclose(both, [0.5, 0.0], rtol=1e-6)


def test_a_word_of_pieces_averages_its_rows():
  m = _hand_built()
  m[3, 4:] = 0.0
  m[3, 4 + 6] = 0.8  # the second piece looks only at pixel 6
  to_pixels = visualize.word_to_pixels(m, [2, 3], pixel_offset=4)
  np.testing.assert_allclose(to_pixels[4], 0.2, rtol=1e-6)
  np.testing.assert_allclose(to_pixels[6], 0.4, rtol=1e-6)


def test_word_spans_merge_wordpieces(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(list(text_lib.SPECIAL_TOKENS) + ["a", "red", "sta", "##r", "##s", "."]) + "\n")
  tok = text_lib.load_tokenizer(str(vocab))
  spans = visualize.word_spans(tok, "a Red stars.", max_len=16)
  assert spans == [("a", [1]), ("Red", [2]), ("stars", [3, 4, 5]), (".", [6])]
  # Cut off by max_len: [CLS] a red [SEP] keeps two words.
  assert [w for w, _ in visualize.word_spans(tok, "a red stars", max_len=4)] == ["a", "red"]


def test_rollout_and_modes_on_hand_built_attention():
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(3, 2, 5, 5)).astype(np.float32)  # [layers, heads, T, T]
  probs /= probs.sum(-1, keepdims=True)
  mix = [0.5 * probs[l].mean(0) + 0.5 * np.eye(5) for l in range(3)]  # rows still sum to 1
  np.testing.assert_allclose(visualize.rollout(probs, 0), mix[0], rtol=1e-5)
  np.testing.assert_allclose(visualize.rollout(probs, 2), mix[2] @ mix[1] @ mix[0], rtol=1e-5)
  np.testing.assert_allclose(visualize.attention_matrix(probs, -1, use_rollout=True).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(visualize.attention_matrix(probs, 1), probs[1].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(visualize.attention_matrix(probs, -1, head=1), probs[2, 1])
  batched = visualize.attention_matrix(np.stack([probs, probs[::-1]]), 2, use_rollout=True)
  np.testing.assert_allclose(batched[0], mix[2] @ mix[1] @ mix[0], rtol=1e-5)
  assert visualize.check_mode(3, 2, -1, None, False) == 2
  for layer, head, roll, needle in [
      (3, None, False, "layer 3 out of range"),
      (0, 2, False, "head 2 out of range"),
      (0, 0, True, "not both"),
  ]:
    with pytest.raises(predict.PredictError, match=needle):
      visualize.check_mode(3, 2, layer, head, roll)


def test_object_pixels_from_the_worlds_ground_truth():
  spec = world.SceneSpec(1, 1, 0.3, 0.45)
  for index in range(20):
    (obj,) = world.make_scene(0, "val", index, 192, spec)
    cells = visualize.object_pixels(obj, 1.0, (3, 3))
    assert np.flatnonzero(cells).tolist() == [obj.cell[0] * 3 + obj.cell[1]], obj
  # An object across a cell border covers both feature pixels (a world with other sizes).
  obj = world.Obj("red", "star", "large", (0, 0), center=(64.0, 30.0), radius=10.0)
  assert np.flatnonzero(visualize.object_pixels(obj, 1.0, (3, 3))).tolist() == [0, 1]
  # At scale 2: x 108..148 (columns 1, 2), y 40..80 (rows 0, 1) of a 6x6 grid.
  assert np.flatnonzero(visualize.object_pixels(obj, 2.0, (6, 6))).tolist() == [1, 2, 7, 8]


# -- the model's attention ----------------------------------------------------------------------------------------


def _tiny_cfg(**overrides):
  cfg = model_config("tiny", "tiny", vocab_size=40)
  cfg.update(overrides)
  return cfg


def _inputs(batch=2, size=(128, 192), length=6):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (batch, *size, 3), dtype=np.uint8)
  mask = np.ones((batch, *size), bool)
  mask[1, 64:] = False  # the second image's bottom row of feature pixels is padding
  ids = rng.integers(5, 40, (batch, length)).astype(np.int32)
  tmask = np.ones((batch, length), np.int32)
  tmask[1, 4:] = 0
  return image, mask, ids, tmask


@pytest.mark.slow
def test_sown_attention_changes_no_output_and_no_parameter():
  cfg = _tiny_cfg()
  model = build_model(cfg, "pretrain")
  variables = init_variables(model, jax.random.key(0), "pretrain")
  assert set(variables) == {"params"} | ({"batch_stats"} & set(variables))  # nothing sown into the variables
  inputs = _inputs()
  plain = model.apply(variables, *inputs)
  sown, state = model.apply(variables, *inputs, mutable=["intermediates"])
  for k in plain:
    np.testing.assert_array_equal(np.asarray(plain[k]), np.asarray(sown[k]), err_msg=k)
  probs = np.asarray(visualize.stack_attention(state["intermediates"]))
  t = inputs[2].shape[1] + 6  # 6 text tokens + a 2x3 pixel grid
  assert probs.shape == (2, cfg.num_layers, cfg.num_heads, t, t) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  # Masked keys (text padding 4, 5; the second image's pixel row 1 = positions 9, 10, 11) get nothing.
  assert np.abs(probs[1][..., [4, 5, 9, 10, 11]]).max() == 0.0
  assert probs[0][..., [4, 5, 9, 10, 11]].min() > 0.0


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "vqa", "nlvr2", "retrieval"])
def test_every_task_model_gives_maps(task):
  cfg = _tiny_cfg(dtype="bfloat16")  # maps come back float32 whatever the compute dtype
  variables = init_variables(build_model(cfg, task), jax.random.key(1), task)
  runner = visualize.AttentionRunner(cfg, task)
  probs, pixel_mask = runner(variables, *_inputs())
  assert probs.shape == (2, 2, 2, 12, 12) and probs.dtype == np.float32
  assert pixel_mask.tolist() == [[True] * 6, [True] * 3 + [False] * 3]
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-2)


@pytest.mark.slow
def test_real_size_model_traces_with_fused_attention_and_remat():
  """BERT-base + ResNet-50 as configured for pre-training (bfloat16, remat, cuDNN attention): the runner's
  model (einsum, no remat) traces to float32 [B, 12, 12, T, T] on an 800x1344 bucket (shapes only)."""
  cfg = model_config("base", "r50", vocab_size=30522)
  cfg.update(dtype="bfloat16", remat=True, attention_impl="cudnn")
  runner = visualize.AttentionRunner(cfg, "pretrain")
  shapes = jax.eval_shape(lambda: init_variables(runner.model, jax.random.key(0), "pretrain"))
  image = jax.ShapeDtypeStruct((1, 832, 1344, 3), jnp.uint8)
  out = jax.eval_shape(
      runner._probs,
      shapes,
      image,
      jax.ShapeDtypeStruct((1, 832, 1344), bool),
      jax.ShapeDtypeStruct((1, 20), jnp.int32),
      jax.ShapeDtypeStruct((1, 20), jnp.int32),
  )
  t = 20 + 13 * 21
  assert out[0].shape == (1, 12, 12, t, t) and out[0].dtype == jnp.float32
  assert out[1].shape == (1, 13 * 21)


def test_maps_are_placed_on_the_image_not_the_padded_bucket():
  """A 150x200 image is resized to 144x192 in a 192x192 bucket: feature pixel (1, 2) covers bucket rows
  64..127 and columns 128..191, i.e. rows 133..266 and columns 267..399 of the 300x400 picture."""
  grid = np.zeros((3, 3), np.float32)
  grid[1, 2] = 1.0
  heat = visualize.upsample(grid, (192, 192), (144, 192), (300, 400), nearest=True)
  assert heat.shape == (300, 400)
  rows, cols = np.nonzero(heat)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (133, 266, 267, 399)
  smooth = visualize.upsample(grid, (192, 192), (144, 192), (300, 400))
  assert np.unravel_index(int(np.argmax(smooth)), smooth.shape)[1] > 300 and smooth[:60, :100].max() == 0.0
  image = np.full((300, 400, 3), 128, np.uint8)
  pic = np.asarray(visualize.overlay(image, heat, "red  0.50"))
  assert pic.shape == (300, 400, 3)
  assert pic[200, 330, 0] > 200 and pic[200, 330, 2] < 100  # the word's pixel in red
  np.testing.assert_array_equal(pic[200, 100], [128, 128, 128])  # an ignored pixel shows the image
  assert pic[5:15, 2:60].mean() < 128  # the label's dark strip


# -- pictures from a checkpoint -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tiny_pretrained):
  return tiny_pretrained


@pytest.fixture(scope="module")
def predictor(workdir):
  return predict.Predictor(str(workdir))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
  """Non-square (150 high, 200 wide), so a picture drawn square or the wrong way round is caught."""
  path = tmp_path_factory.mktemp("img") / "x.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(path)
  return path


@pytest.mark.slow
def test_pictures_have_the_images_aspect_ratio_and_the_files_agree(predictor, image, tmp_path):
  summary = visualize.visualize(
      predictor, str(image), "a red star is left of a blue ring", str(tmp_path), words=["red", "ring"]
  )
  assert [w["word"] for w in summary["words"]] == ["red", "ring"]
  for w in summary["words"]:
    with Image.open(tmp_path / w["file"]) as pic:
      assert pic.format == "PNG" and pic.size == (400, 300)  # 200x150 drawn at 2x: long side >= 256
  with Image.open(tmp_path / "grid.png") as grid:
    assert grid.width == 3 * 400 and grid.height > 300  # the image and two words in one row, under a title
  probs = np.load(tmp_path / "attention.npy")
  maps = np.load(tmp_path / "maps.npy")
  n = summary["pixel_offset"]
  assert summary["tokens"][0] == "[CLS]" and summary["tokens"][-1] == "[SEP]" and len(summary["tokens"]) == n
  # The 150x200 image is resized into the 192x192 bucket as 144x192: a 3x3 grid, all of its cells valid.
  assert summary["pixel_grid"] == [3, 3] and probs.shape == (2, 2, n + 9, n + 9) and maps.shape == (2, 3, 3)
  for w, m in zip(summary["words"], maps):
    expected = probs[-1].mean(0)[w["positions"]].mean(0)[n:]  # default: the last layer, mean over heads
    np.testing.assert_allclose(m.reshape(-1), expected, rtol=1e-5)
    np.testing.assert_allclose(w["pixel_attention"], expected.sum(), rtol=1e-5)


def test_layer_head_and_rollout_choose_other_maps(predictor, image, tmp_path):
  text = "a red star"
  head = visualize.visualize(predictor, str(image), text, str(tmp_path / "h"), layer=0, head=1)
  roll = visualize.visualize(predictor, str(image), text, str(tmp_path / "r"), use_rollout=True)
  assert head["mode"] == "layer 0, head 1" and roll["mode"].startswith("rollout")
  probs = np.load(tmp_path / "h" / "attention.npy")
  n = head["pixel_offset"]
  for k, w in enumerate(head["words"]):
    np.testing.assert_allclose(
        np.load(tmp_path / "h" / "maps.npy")[k].reshape(-1), probs[0, 1][w["positions"]].mean(0)[n:], rtol=1e-5
    )
    roll_rows = visualize.rollout(probs, 1)[w["positions"]].mean(0)[n:]
    np.testing.assert_allclose(np.load(tmp_path / "r" / "maps.npy")[k].reshape(-1), roll_rows, rtol=1e-4)
  # A folder reused for another text keeps no pictures of the old words.
  visualize.visualize(predictor, str(image), "a blue ring", str(tmp_path / "h"))
  assert sorted(p.name for p in (tmp_path / "h").glob("*_*.png")) == ["00_a.png", "01_blue.png", "02_ring.png"]


@pytest.mark.slow
def test_grounding_check_on_the_tiny_checkpoint(predictor):
  report = visualize.grounding_check(predictor, num_images=3, captions_per_image=2)
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
  assert "| layer 1, mean over heads (default) |" in visualize.grounding_table(report)
  with pytest.raises(predict.PredictError, match=r"--num_images must be in 1\.\.16"):
    visualize.grounding_check(predictor, num_images=17)


def test_grounding_check_agrees_with_the_pictures_maps(predictor, tmp_path):
  """The check's share for one scene and caption equals the share computed from `attention_maps` on the
  dataset's JPEG of that scene and the world's ground truth."""
  from pixelbert_jax.data import builders

  s = predictor.data_cfg.synthetic
  objs = world.make_scene(int(s.seed), "val", 0, int(s.image_size), builders.scene_spec(predictor.data_cfg))
  path = tmp_path / "scene.jpg"
  path.write_bytes(world.encode_jpeg(world.render(int(s.seed), "val", 0, objs, int(s.image_size))))
  caption = world.captions(int(s.seed), "val", 0, objs, 1)[0][0]
  report = visualize.grounding_check(predictor, num_images=1, captions_per_image=1)
  for kind, names in (("colour", world.COLOURS), ("shape", world.SHAPES)):
    words = [w for w in caption.split() if w in names]
    got = visualize.attention_maps(predictor, str(path), caption, words=words, use_rollout=True)
    shares = [
        visualize.object_share(m.reshape(-1), visualize.object_pixels(o, 1.0, (3, 3)), np.ones(9, bool))
        for w, m in zip(got["words"], got["maps"])
        for o in objs
        if w in (o.colour, o.shape)
    ]
    assert len(shares) == len(words) > 0
    np.testing.assert_allclose(
        report["variants"]["as written"]["rollout through layer 1"][kind]["share"], np.mean(shares), rtol=1e-4
    )


# -- the command line ---------------------------------------------------------------------------------------------


def _main(capsys, *args):
  rc = visualize.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return rc, out, err


@pytest.mark.slow
def test_cli_errors_are_one_line(workdir, image, tmp_path, capsys):
  cases = [
      (
          ["--checkpoint", tmp_path / "nowhere", "--image", image, "--text", "a", "--out", tmp_path / "o"],
          f"error: Checkpoint path {tmp_path / 'nowhere'} does not exist",
      ),
      (
          ["--checkpoint", workdir, "--image", tmp_path / "no.png", "--text", "a red star", "--out", tmp_path / "o"],
          f"error: image {tmp_path / 'no.png'} does not exist",
      ),
      (
          [
              "--checkpoint",
              workdir,
              "--image",
              workdir / "config.json",
              "--text",
              "a red star",
              "--out",
              tmp_path / "o",
          ],
          f"error: image {workdir / 'config.json'} is unreadable",
      ),
      (["--checkpoint", workdir, "--image", image, "--text", "  ", "--out", tmp_path / "o"], "error: empty text"),
      (
          [
              "--checkpoint",
              workdir,
              "--image",
              image,
              "--text",
              "a red star",
              "--out",
              tmp_path / "o",
              "--words",
              "blue",
          ],
          "error: word(s) ['blue'] not in the text 'a red star'",
      ),
      (
          ["--checkpoint", workdir, "--image", image, "--text", "a red star", "--out", tmp_path / "o", "--layer", "5"],
          "error: layer 5 out of range",
      ),
      (["--checkpoint", workdir, "--grounding_check", "--num_images", "0"], "error: --num_images must be in"),
  ]
  for args, start in cases:
    rc, out, err = _main(capsys, *args)
    assert rc == 2 and out == "", (args, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith(start), (args, err)
  assert not (tmp_path / "o").exists()  # nothing written on bad input


@pytest.mark.slow
def test_cli_writes_the_pictures(workdir, image, tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "pixelbert_jax.visualize",
          "--checkpoint",
          str(workdir),
          "--image",
          str(image),
          "--text",
          "the picture shows a red star",
          "--out",
          str(tmp_path / "v"),
          "--rollout",
      ],
      cwd=th.REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout)
  assert [w["word"] for w in summary["words"]] == ["the", "picture", "shows", "a", "red", "star"]
  assert sorted(p.name for p in (tmp_path / "v").iterdir()) == sorted(
      [w["file"] for w in summary["words"]] + ["grid.png", "attention.npy", "maps.npy", "summary.json"]
  )
