"""attention, drawing, visualize: word pieces and rollout on hand-built matrices, the sown attention leaving the
model unchanged, every task's and a real-size model's maps, the pictures' aspect ratio, one-line CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from pixelbert_jax import attention, drawing, model_context, partitioning, predict, visualize
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


def test_a_word_of_pieces_averages_its_rows():
  m = _hand_built()
  m[3, 4:] = 0.0
  m[3, 4 + 6] = 0.8  # the second piece looks only at pixel 6
  to_pixels = attention.word_to_pixels(m, [2, 3], pixel_offset=4)
  np.testing.assert_allclose(to_pixels[4], 0.2, rtol=1e-6)
  np.testing.assert_allclose(to_pixels[6], 0.4, rtol=1e-6)


def test_word_spans_merge_wordpieces(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(list(text_lib.SPECIAL_TOKENS) + ["a", "red", "sta", "##r", "##s", "."]) + "\n")
  tok = text_lib.load_tokenizer(str(vocab))
  spans = attention.word_spans(tok, "a Red stars.", max_len=16)
  assert spans == [("a", [1]), ("Red", [2]), ("stars", [3, 4, 5]), (".", [6])]
  # Cut off by max_len: [CLS] a red [SEP] keeps two words.
  assert [w for w, _ in attention.word_spans(tok, "a red stars", max_len=4)] == ["a", "red"]


def test_rollout_and_modes_on_hand_built_attention():
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(3, 2, 5, 5)).astype(np.float32)  # [layers, heads, T, T]
  probs /= probs.sum(-1, keepdims=True)
  mix = [0.5 * probs[l].mean(0) + 0.5 * np.eye(5) for l in range(3)]  # rows still sum to 1
  np.testing.assert_allclose(attention.rollout(probs, 0), mix[0], rtol=1e-5)
  np.testing.assert_allclose(attention.rollout(probs, 2), mix[2] @ mix[1] @ mix[0], rtol=1e-5)
  np.testing.assert_allclose(attention.attention_matrix(probs, -1, use_rollout=True).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(attention.attention_matrix(probs, 1), probs[1].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(attention.attention_matrix(probs, -1, head=1), probs[2, 1])
  batched = attention.attention_matrix(np.stack([probs, probs[::-1]]), 2, use_rollout=True)
  np.testing.assert_allclose(batched[0], mix[2] @ mix[1] @ mix[0], rtol=1e-5)
  assert attention.check_mode(3, 2, -1, None, False) == 2
  for layer, head, roll, needle in [
      (3, None, False, "layer 3 out of range"),
      (0, 2, False, "head 2 out of range"),
      (0, 0, True, "not both"),
  ]:
    with pytest.raises(predict.PredictError, match=needle):
      attention.check_mode(3, 2, layer, head, roll)


# -- the model's attention ----------------------------------------------------------------------------------------


def _tiny_cfg(**overrides):
  cfg = model_config("tiny", "tiny", vocab_size=40)
  cfg.update(overrides)
  return cfg


def _runner(cfg, task: str, text_len: int = 6) -> attention.AttentionRunner:
  """The runner of `cfg`'s model for `task`, made readable, through the model context every caller builds."""
  model = attention.readable_model_config(cfg)
  config = ml_collections.ConfigDict(dict(task=task, model=model, data=dict(max_text_len=text_len)))
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  return attention.AttentionRunner(model_context.ModelContext(config, mesh))


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
  probs = np.asarray(attention.stack_attention(state["intermediates"]))
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
  runner = _runner(cfg, task)
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
  runner = _runner(cfg, "pretrain", text_len=20)
  shapes = runner.context.abstract_variables
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


def test_the_runner_refuses_a_model_whose_attention_cannot_be_read():
  config = ml_collections.ConfigDict(dict(task="pretrain", model=_tiny_cfg(remat=True), data=dict(max_text_len=6)))
  context = model_context.ModelContext(config, partitioning.make_mesh((1, 1, 1), jax.devices()[:1]))
  with pytest.raises(ValueError, match=r"model.remat=True: the attention can be read only with 'einsum' and no"):
    attention.AttentionRunner(context)


def test_maps_are_placed_on_the_image_not_the_padded_bucket():
  """A 150x200 image is resized to 144x192 in a 192x192 bucket: feature pixel (1, 2) covers bucket rows
  64..127 and columns 128..191, i.e. rows 133..266 and columns 267..399 of the 300x400 picture."""
  grid = np.zeros((3, 3), np.float32)
  grid[1, 2] = 1.0
  heat = drawing.upsample(grid, (192, 192), (144, 192), (300, 400), nearest=True)
  assert heat.shape == (300, 400)
  rows, cols = np.nonzero(heat)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (133, 266, 267, 399)
  smooth = drawing.upsample(grid, (192, 192), (144, 192), (300, 400))
  assert np.unravel_index(int(np.argmax(smooth)), smooth.shape)[1] > 300 and smooth[:60, :100].max() == 0.0
  image = np.full((300, 400, 3), 128, np.uint8)
  pic = np.asarray(drawing.overlay(image, heat, "red  0.50"))
  assert pic.shape == (300, 400, 3)
  assert pic[200, 330, 0] > 200 and pic[200, 330, 2] < 100  # the word's pixel in red
  np.testing.assert_array_equal(pic[200, 100], [128, 128, 128])  # an ignored pixel shows the image
  assert pic[5:15, 2:60].mean() < 128  # the label's dark strip


# -- pictures from a checkpoint -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tiny_pretrained):
  return tiny_pretrained


@pytest.fixture(scope="module")
def maps(workdir):
  """One AttentionMaps for the module: its runner compiles once."""
  return attention.AttentionMaps(str(workdir))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
  """Non-square (150 high, 200 wide), so a picture drawn square or the wrong way round is caught."""
  path = tmp_path_factory.mktemp("img") / "x.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(path)
  return path


@pytest.mark.slow
def test_pictures_have_the_images_aspect_ratio_and_the_files_agree(maps, image, tmp_path):
  summary = visualize.visualize(
      maps, str(image), "a red star is left of a blue ring", str(tmp_path), words=["red", "ring"]
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


def test_layer_head_and_rollout_choose_other_maps(maps, image, tmp_path):
  text = "a red star"
  head = visualize.visualize(maps, str(image), text, str(tmp_path / "h"), layer=0, head=1)
  roll = visualize.visualize(maps, str(image), text, str(tmp_path / "r"), use_rollout=True)
  assert head["mode"] == "layer 0, head 1" and roll["mode"].startswith("rollout")
  probs = np.load(tmp_path / "h" / "attention.npy")
  n = head["pixel_offset"]
  for k, w in enumerate(head["words"]):
    np.testing.assert_allclose(
        np.load(tmp_path / "h" / "maps.npy")[k].reshape(-1), probs[0, 1][w["positions"]].mean(0)[n:], rtol=1e-5
    )
    roll_rows = attention.rollout(probs, 1)[w["positions"]].mean(0)[n:]
    np.testing.assert_allclose(np.load(tmp_path / "r" / "maps.npy")[k].reshape(-1), roll_rows, rtol=1e-4)
  # A folder reused for another text keeps no pictures of the old words.
  visualize.visualize(maps, str(image), "a blue ring", str(tmp_path / "h"))
  assert sorted(p.name for p in (tmp_path / "h").glob("*_*.png")) == ["00_a.png", "01_blue.png", "02_ring.png"]


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
