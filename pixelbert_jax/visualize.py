"""Where each word looks: heat maps of Pixel-BERT's text->pixel attention, and a check of them on the synthetic world.

  python -m pixelbert_jax.visualize --checkpoint WORKDIR --image IMG --text "a red star" --out DIR \
      [--words red star] [--layer L] [--head H] [--rollout]
  python -m pixelbert_jax.visualize --grounding_check --checkpoint WORKDIR [--num_images 200] [--out DIR]

The model reads `[CLS] text [SEP] pixels`; the pixels are the (H/64)x(W/64) grid of feature pixels of the
resized image, row-major, all of them (inference never samples). A word's map is the attention its tokens
(wordpieces of one word, averaged) pay to the pixel tokens: by default the mean over the heads of the last
layer; `--layer` (0-based, negative counts from the end) and `--head` pick others, and `--rollout`
multiplies the head-averaged attention of the layers up to `--layer`, each mixed half-half with the
residual's identity (Abnar & Zuidema 2020). Maps are float32 whatever the model's dtype.

DIR gets `NN_word.png` per word (the image under the upsampled map, the word and its score, i.e. the share
of the word's attention that goes to pixels at all, printed on it), `grid.png` (the image and every word),
`attention.npy` (float32 [layers, heads, T, T]: every layer's and head's attention, T = text tokens + pixels),
`maps.npy` (float32 [words, gh, gw]: each word's attention to the pixel grid, as drawn) and `summary.json`.
Any task's checkpoint works: only the shared encoder runs (an NLVR2 model sees the one image given, as its
first image). Python: `visualize(Predictor(WORKDIR), image_path, text, out_dir, words=..., layer=..., ...)`.

`--grounding_check` needs a checkpoint trained on the synthetic world: it regenerates held-out scenes from
the checkpoint's data config and reports, for the colour and shape words of their captions, the mean share
of the word's pixel attention that falls on the feature pixels of the object the word names, against that
object's share of the image's feature pixels, for every layer, head and rollout.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import weakref
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from PIL import Image, ImageDraw, ImageFont

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import cli_errors, paths
from pixelbert_jax.data import text as text_lib
from pixelbert_jax.data.preprocess import resize_and_pad
from pixelbert_jax.models.build import build_model
from pixelbert_jax.models.pixel_bert import CELL
from pixelbert_jax.predict import PredictError, Predictor

MIN_LONG_SIDE = 256  # smaller images are drawn at an integer multiple of their size, so labels stay legible
GRID_COLUMNS = 4

# ---------------------------------------------------------------------------------------------------------------
# Attention from the model


class AttentionRunner:
  """A task's model rebuilt with einsum attention (the fused kinds never form the matrix) and without remat:
  the same parameters. Runs only the shared encoder (every task has it; NLVR2 with one image) and returns
  what every layer's attention module sowed."""

  def __init__(self, model_cfg, task: str):
    cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    cfg.attention_impl = "einsum"
    cfg.remat = False
    self.model = build_model(cfg, task)
    self.num_layers, self.num_heads = int(cfg.num_layers), int(cfg.num_heads)
    self._run = jax.jit(self._probs)

  def _probs(self, variables, image, image_mask, input_ids, text_mask):
    def encoder(module, *args):
      return module.encoder(*args, train=False)["pixel_mask"]

    pixel_mask, state = self.model.apply(
        variables, image, image_mask, input_ids, text_mask, method=encoder, mutable=["intermediates"]
    )
    return stack_attention(state["intermediates"]), pixel_mask

  def __call__(self, variables, image, image_mask, input_ids, text_mask) -> tuple[np.ndarray, np.ndarray]:
    """-> (float32 [B, layers, heads, T, T], bool [B, P]); T = input_ids' length + P."""
    probs, pixel_mask = self._run(variables, image, image_mask, input_ids, text_mask)
    return np.asarray(probs, np.float32), np.asarray(pixel_mask, bool)


def stack_attention(intermediates: dict) -> jax.Array:
  """The `attention_probs` every BertSelfAttention sowed -> float32 [B, layers, heads, T, T], layers in order.

  Each layer ran once (the encoder alone), so each sown tuple holds one array."""
  found = {}
  for path, value in traverse_util.flatten_dict(intermediates).items():
    if path[-1] != "attention_probs":
      continue
    layer = [int(m.group(1)) for p in path if (m := re.fullmatch(r"layer_(\d+)", p))]
    if len(layer) != 1 or len(value) != 1:
      raise ValueError(f"unexpected sown attention at {'/'.join(path)} ({len(value)} values)")
    found[layer[0]] = value[0]
  if sorted(found) != list(range(len(found))) or not found:
    raise ValueError(f"attention probabilities of layers {sorted(found)} sown; expected 0..n-1 (einsum attention?)")
  return jnp.stack([found[i] for i in range(len(found))], axis=1).astype(jnp.float32)


_RUNNERS: "weakref.WeakKeyDictionary[Predictor, AttentionRunner]" = weakref.WeakKeyDictionary()


def _runner(predictor: Predictor) -> AttentionRunner:
  if predictor not in _RUNNERS:
    _RUNNERS[predictor] = AttentionRunner(predictor.model.cfg, predictor.task)
  return _RUNNERS[predictor]


# ---------------------------------------------------------------------------------------------------------------
# Attention matrices -> word maps (numpy, float32)


def rollout(probs: np.ndarray, upto: int) -> np.ndarray:
  """Attention rollout through layers 0..upto: float32 [..., layers, heads, T, T] -> [..., T, T].

  Each layer's head mean is mixed half-half with the identity (the residual) and renormalised, then the
  layers are multiplied, last on the left: row i says how much token i's final state draws on each input."""
  a = probs[..., : upto + 1, :, :, :].mean(axis=-3, dtype=np.float32)  # [..., l, T, T]
  t = a.shape[-1]
  a = 0.5 * a + 0.5 * np.eye(t, dtype=np.float32)
  a = a / a.sum(axis=-1, keepdims=True)
  out = a[..., 0, :, :]
  for layer in range(1, a.shape[-3]):
    out = np.matmul(a[..., layer, :, :], out)
  return out.astype(np.float32)


def check_mode(num_layers: int, num_heads: int, layer: int, head: int | None, use_rollout: bool) -> int:
  """Validates layer/head against the model; returns the layer as a non-negative index."""
  if not -num_layers <= layer < num_layers:
    raise PredictError(
        f"layer {layer} out of range: the model has {num_layers} layers (0..{num_layers - 1}, " f"or -1 for the last)"
    )
  if head is not None:
    if use_rollout:
      raise PredictError("rollout averages the heads: give --head or --rollout, not both")
    if not 0 <= head < num_heads:
      raise PredictError(f"head {head} out of range: the model has {num_heads} heads (0..{num_heads - 1})")
  return layer % num_layers


def attention_matrix(
    probs: np.ndarray,
    layer: int,
    head: int | None = None,
    use_rollout: bool = False,
) -> np.ndarray:
  """float32 [..., layers, heads, T, T] -> [..., T, T]: one head, the head mean of one layer, or the rollout
  up to that layer."""
  if use_rollout:
    return rollout(probs, layer % probs.shape[-4])
  chosen = probs[..., layer, :, :, :]
  return chosen[..., head, :, :] if head is not None else chosen.mean(axis=-3, dtype=np.float32)


def word_spans(tokenizer, text: str, max_len: int) -> list[tuple[str, list[int]]]:
  """The words of `text` as the model sees them: (word as written, its token positions in `[CLS] text [SEP]`).

  Wordpieces (`##...`) join the word they continue; punctuation is its own word (BERT's pre-tokenizer);
  words cut off by max_len are left out."""
  enc = tokenizer(text, max_length=max_len, truncation=True, return_offsets_mapping=True)
  positions: dict[int, list[int]] = {}
  for t, w in enumerate(enc.word_ids()):
    if w is not None:
      positions.setdefault(w, []).append(t)
  offsets = enc["offset_mapping"]
  return [(text[offsets[ts[0]][0] : offsets[ts[-1]][1]], ts) for _, ts in sorted(positions.items())]


def word_to_pixels(matrix: np.ndarray, positions: Sequence[int], pixel_offset: int) -> np.ndarray:
  """float32 [T, T] -> [P]: the attention the word's tokens (rows, averaged) pay to the pixel tokens."""
  rows = matrix[np.asarray(positions)]
  return rows.mean(axis=0, dtype=np.float32)[pixel_offset:]


def object_share(attention: np.ndarray, on_object: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Share of a word's pixel attention that falls on the object's feature pixels.

  attention float [..., P] (a word's attention to the pixel tokens), on_object / valid bool [..., P]
  -> [...] = sum(attention on valid object pixels) / sum(attention on valid pixels); nan with no attention."""
  a = np.asarray(attention, np.float64) * np.asarray(valid, bool)
  total = a.sum(axis=-1)
  hit = (a * np.asarray(on_object, bool)).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, hit / np.where(total > 0, total, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------------------------
# Drawing (PIL + numpy)

# Jet-like, from blue (little attention) through cyan and yellow to red (the word's most attended pixel).
_CMAP_STOPS = np.array([0.0, 0.35, 0.65, 1.0], np.float32)
_CMAP_RGB = np.array([(0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0)], np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
  """float [..] in [0, 1] -> uint8 [.., 3]."""
  v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
  rgb = [np.interp(v, _CMAP_STOPS, _CMAP_RGB[:, c]) for c in range(3)]
  return np.clip(np.stack(rgb, axis=-1), 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
    return ImageFont.load_default()


def output_size(height: int, width: int) -> tuple[int, int]:
  """(H, W) the pictures are drawn at: the image's, times the integer that brings its long side to at least
  MIN_LONG_SIDE (an integer keeps the aspect ratio exact)."""
  k = max(1, math.ceil(MIN_LONG_SIDE / max(height, width)))
  return height * k, width * k


def upsample(
    grid_map: np.ndarray,
    bucket: tuple[int, int],
    valid_hw: tuple[int, int],
    out_hw: tuple[int, int],
    nearest: bool = False,
) -> np.ndarray:
  """float32 [gh, gw] over the padded bucket's 64x64 cells -> [H, W] over the image alone.

  Feature pixel (i, j) covers bucket rows 64i..64i+63 and columns 64j..64j+63; the image is the bucket's
  top-left valid_hw (resize_and_pad), so the map is upsampled to the bucket, cropped, then resized to out_hw."""
  resample = Image.NEAREST if nearest else Image.BILINEAR
  gh, gw = grid_map.shape
  full = Image.fromarray(np.asarray(grid_map, np.float32), mode="F")
  full = full.resize((gw * CELL, gh * CELL), resample)
  arr = np.zeros(bucket, np.float32)
  h, w = min(bucket[0], gh * CELL), min(bucket[1], gw * CELL)
  arr[:h, :w] = np.asarray(full)[:h, :w]
  crop = Image.fromarray(arr[: valid_hw[0], : valid_hw[1]], mode="F")
  return np.asarray(crop.resize((out_hw[1], out_hw[0]), resample), np.float32)


def _label(img: Image.Image, label: str) -> Image.Image:
  """Writes `label` in white on a translucent dark strip across the top of the picture."""
  size = max(11, img.width // 18)
  font = _font(size)
  overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
  draw = ImageDraw.Draw(overlay)
  box = draw.textbbox((0, 0), label, font=font)
  pad = max(2, size // 4)
  draw.rectangle((0, 0, img.width, box[3] + 2 * pad), fill=(0, 0, 0, 150))
  draw.text((pad, pad), label, font=font, fill=(255, 255, 255, 255))
  return Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")


def overlay(image: np.ndarray, heat: np.ndarray, label: str, alpha: float = 0.7) -> Image.Image:
  """uint8 [H,W,3] image, float [H,W] map -> the labelled picture.

  The map is scaled to its own maximum and both colours and opacity follow it, so pixels the word ignores
  show the image as it is, and a word that attends everywhere alike covers it all in red."""
  peak = float(heat.max()) if heat.size else 0.0
  v = np.clip(heat / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(heat, np.float32)
  a = (alpha * v)[..., None]
  mixed = (1 - a) * image.astype(np.float32) + a * colormap(v).astype(np.float32)
  return _label(Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8)), label)


def grid_picture(tiles: Sequence[Image.Image], title: str, columns: int = GRID_COLUMNS) -> Image.Image:
  """Tiles of one size in rows of `columns`, under a strip with `title`."""
  w, h = tiles[0].size
  cols = min(columns, len(tiles))
  rows = math.ceil(len(tiles) / cols)
  size = max(11, w // 18)
  font = _font(size)
  strip = size + size // 2 + 4
  out = Image.new("RGB", (cols * w, rows * h + strip), (255, 255, 255))
  ImageDraw.Draw(out).text((4, 2), title, font=font, fill=(0, 0, 0))
  for k, tile in enumerate(tiles):
    out.paste(tile, ((k % cols) * w, strip + (k // cols) * h))
  return out


def _file_word(word: str) -> str:
  return re.sub(r"[^A-Za-z0-9_-]+", "_", word).strip("_")[:40] or "word"


# ---------------------------------------------------------------------------------------------------------------
# The heat-map command


def _model_input(predictor: Predictor, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
  """uint8 [h,w,3] -> (image [1,H,W,3], mask [1,H,W], the resized image's (h', w') inside the bucket)."""
  c = predictor.data_cfg
  padded, mask = resize_and_pad(
      image, short_side=int(c.image_short_side), long_side=int(c.image_long_side), buckets=[tuple(b) for b in c.buckets]
  )
  valid_hw = (int(mask.any(axis=1).sum()), int(mask.any(axis=0).sum()))
  return padded[None], mask[None], valid_hw


def attention_maps(
    predictor: Predictor,
    image_path: str,
    text: str,
    words: Sequence[str] | None = None,
    layer: int = -1,
    head: int | None = None,
    use_rollout: bool = False,
) -> dict[str, Any]:
  """Everything `visualize` draws: the image, the attention, each chosen word's map over the pixel grid.

  -> dict(image uint8 [h,w,3], probs float32 [layers, heads, T, T], maps float32 [N, gh, gw], words [N],
  positions, scores [N] (share of each word's attention on pixels), summary (JSON-ready))."""
  runner = _runner(predictor)
  layer_index = check_mode(runner.num_layers, runner.num_heads, layer, head, use_rollout)
  image = predictor.decode(image_path)
  ids, tmask = predictor.encode_texts([text], "text")
  n = int(tmask[0].sum())  # padding tokens change nothing (masked keys): leave them out of the matrices
  ids, tmask = ids[:, :n], tmask[:, :n]
  spans = word_spans(predictor.tokenizer, text.strip(), int(predictor.data_cfg.max_text_len))
  if words:
    wanted = list(dict.fromkeys(w.strip().lower() for w in words))
    known = {w.lower() for w, _ in spans}
    missing = [w for w in wanted if w not in known]
    if missing:
      raise PredictError(f"word(s) {missing} not in the text {text.strip()!r} (its words: " f"{[w for w, _ in spans]})")
    spans = [s for s in spans if s[0].lower() in wanted]
  if not spans:
    raise PredictError(f"the text {text!r} has no words to draw")
  batch, mask, valid_hw = _model_input(predictor, image)
  probs, pixel_mask = runner(predictor.variables, batch, mask, ids, tmask)
  probs, pixel_mask = probs[0], pixel_mask[0]  # [layers, heads, T, T], [P]
  gh, gw = batch.shape[1] // CELL, batch.shape[2] // CELL
  if gh * gw != pixel_mask.shape[0]:
    raise ValueError(f"pixel grid {gh}x{gw} does not match the model's {pixel_mask.shape[0]} pixels")
  matrix = attention_matrix(probs, layer_index, head, use_rollout)
  to_pixels = np.stack([word_to_pixels(matrix, pos, n) * pixel_mask for _, pos in spans])  # [N, P]
  scores = to_pixels.sum(axis=-1)
  tokens = predictor.tokenizer.convert_ids_to_tokens([int(i) for i in ids[0]])
  mode = ("rollout through layers 0.." if use_rollout else "layer ") + str(layer_index)
  mode += "" if use_rollout else (f", head {head}" if head is not None else ", mean over heads")
  summary = dict(
      task=predictor.task,
      step=int(predictor.step),
      text=text.strip(),
      tokens=tokens,
      pixel_offset=n,
      pixel_grid=[gh, gw],
      valid_pixels=int(pixel_mask.sum()),
      image_size=list(image.shape[:2]),
      layer=layer_index,
      head=head,
      rollout=bool(use_rollout),
      mode=mode,
      words=[
          dict(
              word=w,
              tokens=[tokens[p] for p in pos],
              positions=list(pos),
              pixel_attention=float(s),
              peak_pixel=[int(i) for i in np.unravel_index(int(np.argmax(a)), (gh, gw))],
          )
          for (w, pos), s, a in zip(spans, scores, to_pixels)
      ],
  )
  return dict(
      image=image,
      probs=probs,
      maps=to_pixels.reshape(-1, gh, gw).astype(np.float32),
      words=[w for w, _ in spans],
      scores=scores,
      bucket=batch.shape[1:3],
      valid_hw=valid_hw,
      summary=summary,
  )


def _remove_previous_pictures(out: epath.Path) -> None:
  """Deletes the word pictures an earlier run listed in out/summary.json (and only those), so a folder
  reused for another text holds no stale words."""
  try:
    previous = json.loads((out / "summary.json").read_text())
    names = [w["file"] for w in previous.get("words", []) if isinstance(w, dict) and "file" in w]
  except (OSError, ValueError, AttributeError, TypeError):
    return
  for name in names:
    if isinstance(name, str) and re.fullmatch(r"\d+_[A-Za-z0-9_-]+\.png", name) and (out / name).exists():
      (out / name).unlink()


def visualize(
    predictor: Predictor,
    image_path: str,
    text: str,
    out_dir: str,
    words: Sequence[str] | None = None,
    layer: int = -1,
    head: int | None = None,
    use_rollout: bool = False,
    nearest: bool = False,
) -> dict[str, Any]:
  """Writes the per-word pictures, grid.png, attention.npy, maps.npy and summary.json into out_dir; returns
  the summary (with the files' paths)."""
  got = attention_maps(predictor, image_path, text, words, layer, head, use_rollout)
  out = epath.Path(paths.resolve(out_dir))
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PredictError(f"cannot create the output folder {out_dir}: {e}") from e
  _remove_previous_pictures(out)
  h, w = output_size(*got["image"].shape[:2])
  picture = (
      np.asarray(Image.fromarray(got["image"]).resize((w, h), Image.BICUBIC))
      if (h, w) != got["image"].shape[:2]
      else got["image"]
  )
  tiles = [_label(Image.fromarray(picture), "image")]
  summary = got["summary"]
  for k, (word, grid_map, entry) in enumerate(zip(got["words"], got["maps"], summary["words"])):
    heat = upsample(grid_map, tuple(got["bucket"]), got["valid_hw"], (h, w), nearest)
    tile = overlay(picture, heat, f"{word}  {entry['pixel_attention']:.2f}")
    name = f"{k:02d}_{_file_word(word)}.png"
    tile.save(str(out / name))
    entry["file"] = name
    tiles.append(tile)
  grid_picture(tiles, f"{summary['text']}  ({summary['mode']})").save(str(out / "grid.png"))
  np.save(str(out / "attention.npy"), got["probs"])
  np.save(str(out / "maps.npy"), got["maps"])
  summary["files"] = dict(grid="grid.png", attention="attention.npy", maps="maps.npy")
  summary["out_dir"] = str(out)
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


# ---------------------------------------------------------------------------------------------------------------
# The grounding check on the synthetic world


def object_pixels(obj, scale: float, grid: tuple[int, int]) -> np.ndarray:
  """bool [gh*gw]: the feature pixels whose 64x64 cell meets the object's bounding box (row-major).

  `scale` maps world pixels to the resized image (1 when the world's image size is the bucket's)."""
  cx, cy = obj.center
  x0, x1 = (cx - obj.radius) * scale, (cx + obj.radius) * scale
  y0, y1 = (cy - obj.radius) * scale, (cy + obj.radius) * scale
  rows = (np.arange(grid[0]) * CELL < y1) & ((np.arange(grid[0]) + 1) * CELL > y0)
  cols = (np.arange(grid[1]) * CELL < x1) & ((np.arange(grid[1]) + 1) * CELL > x0)
  return (rows[:, None] & cols[None, :]).reshape(-1)


KINDS = ("colour", "shape", "other")  # other: the caption's remaining words, against all objects (a control)


def _grounding_examples(predictor: Predictor, split: str, num_images: int, captions_per_image: int):
  """Yields one (image [1,H,W,3], mask [1,H,W], ids [L], text_mask [L], words) per caption of each held-out
  scene, regenerated exactly as the dataset stored it (JPEG included); words: (token mask [L], kind, the
  feature pixels [P] of the object the word names, or of all objects for the other words)."""
  from pixelbert_jax.data import builders
  from pixelbert_jax.data import synthetic as world
  from pixelbert_jax.data.preprocess import decode_image

  c = predictor.data_cfg
  s = c.synthetic
  spec = builders.scene_spec(c)
  max_len = int(c.max_text_len)
  for i in range(num_images):
    objs = world.make_scene(int(s.seed), split, i, int(s.image_size), spec)
    jpeg = world.encode_jpeg(world.render(int(s.seed), split, i, objs, int(s.image_size)))
    image, mask, valid_hw = _model_input(predictor, decode_image(jpeg, name=f"synthetic-{split}-{i}"))
    grid = (image.shape[1] // CELL, image.shape[2] // CELL)
    scale = valid_hw[1] / int(s.image_size)
    cells = [object_pixels(o, scale, grid) for o in objs]
    for caption, _ in world.captions(int(s.seed), split, i, objs, captions_per_image):
      words = []
      for wi, word in enumerate(caption.split()):
        kind = "colour" if word in world.COLOURS else "shape" if word in world.SHAPES else "other"
        named = [k for k, o in enumerate(objs) if word in (o.colour, o.shape)]
        if kind != "other" and len(named) != 1:  # colours and shapes are unique within a scene
          continue
        _, _, token_mask = text_lib.encode(predictor.tokenizer, caption, max_len, grounded_words=[wi])
        if token_mask.any():
          words.append((token_mask, kind, cells[named[0]] if named else np.any(cells, axis=0)))
      ids, tmask, _ = text_lib.encode(predictor.tokenizer, caption, max_len)
      yield image, mask, ids, tmask, words


def _modes(num_layers: int, num_heads: int) -> list[tuple[str, int, int | None, bool]]:
  """(name, layer, head, rollout) of every way to read the attention; the first is the pictures' default."""
  last = num_layers - 1
  modes = [(f"layer {last}, mean over heads", last, None, False)]
  modes += [(f"layer {l}, mean over heads", l, None, False) for l in range(last)]
  modes += [(f"rollout through layer {l}", l, None, True) for l in range(num_layers)]
  modes += [(f"layer {l}, head {h}", l, h, False) for l in range(num_layers) for h in range(num_heads)]
  return modes


GROUNDING_VARIANTS = ("as written", "masked")  # the word itself, or [MASK] in its place (what MLM asks)


class _Tally:
  """Shares by variant, mode and kind; the object's pixel share and the attention on pixels at all by kind."""

  def __init__(self, modes):
    self.modes = modes
    self.shares = {v: {m[0]: {k: [] for k in KINDS} for m in modes} for v in GROUNDING_VARIANTS}
    self.pixel_mass = {v: {k: [] for k in KINDS} for v in GROUNDING_VARIANTS}
    self.base = {k: [] for k in KINDS}

  def add(self, variant: str, probs: np.ndarray, pixel_mask: np.ndarray, rows: list) -> None:
    """probs [B, layers, heads, T, T]; rows: (batch index, token mask [L], kind, object pixels [P])."""
    index = np.array([r[0] for r in rows])
    weights = np.stack([r[1] for r in rows]).astype(np.float32)  # [R, L]
    weights /= weights.sum(axis=1, keepdims=True)
    on_object, valid = np.stack([r[3] for r in rows]), pixel_mask[index]
    kinds = [r[2] for r in rows]
    offset = weights.shape[1]
    for name, layer, head, use_rollout in self.modes:
      matrix = attention_matrix(probs, layer, head, use_rollout)[index]  # [R, T, T]
      to_pixels = np.einsum("rl,rlp->rp", weights, matrix[:, :offset, offset:]) * valid
      for kind, share in zip(kinds, object_share(to_pixels, on_object, valid)):
        self.shares[variant][name][kind].append(float(share))
      if name == self.modes[0][0]:
        for kind, mass in zip(kinds, to_pixels.sum(axis=1)):
          self.pixel_mass[variant][kind].append(float(mass))
    if variant == GROUNDING_VARIANTS[0]:
      for kind, obj, ok in zip(kinds, on_object, valid):
        self.base[kind].append(float((obj & ok).sum() / ok.sum()))


def grounding_check(
    predictor: Predictor, num_images: int = 200, split: str = "val", captions_per_image: int = 5, batch_size: int = 32
) -> dict[str, Any]:
  """Mean share of colour / shape words' pixel attention on the named object's feature pixels, against the
  object's share of the valid feature pixels, on `num_images` regenerated scenes of `split`.

  Every mode (each layer's head mean, the rollout through each layer, each head) is measured for the word as
  written (one pass per caption) and for the word replaced by [MASK] (one pass per word: where the model looks
  to fill it in, as MLM asks). The caption's other words, against all of the scene's objects, are the control
  for attention that goes to objects whatever the word."""
  c = predictor.data_cfg
  if c.name != "synthetic":
    raise PredictError(
        f"the grounding check needs a checkpoint trained on the synthetic world; "
        f"{predictor.workdir} was trained on {c.name!r}"
    )
  available = int(c.synthetic[f"num_{split}"]) if f"num_{split}" in c.synthetic else 0
  if not 0 < num_images <= available:
    raise PredictError(f"--num_images must be in 1..{available} (the {split} split's images), got {num_images}")
  if captions_per_image < 1:
    raise PredictError(f"--captions_per_image must be positive, got {captions_per_image}")
  runner = _runner(predictor)
  modes = _modes(runner.num_layers, runner.num_heads)
  mask_id = int(predictor.tokenizer.convert_tokens_to_ids("[MASK]"))
  tally = _Tally(modes)

  def run(variant, batch):  # batch: (image, mask, ids, text_mask, rows)
    probs, pixel_mask = runner(
        predictor.variables,
        np.concatenate([b[0] for b in batch]),
        np.concatenate([b[1] for b in batch]),
        np.stack([b[2] for b in batch]),
        np.stack([b[3] for b in batch]),
    )
    tally.add(variant, probs, pixel_mask, [(k, *row) for k, b in enumerate(batch) for row in b[4]])

  written, masked = [], []
  for image, mask, ids, tmask, words in _grounding_examples(predictor, split, num_images, captions_per_image):
    written.append((image, mask, ids, tmask, words))
    for token_mask, kind, on_object in words:
      if kind != "other":
        masked.append(
            (
                image,
                mask,
                np.where(token_mask > 0, mask_id, ids).astype(ids.dtype),
                tmask,
                [(token_mask, kind, on_object)],
            )
        )
    for variant, pending in zip(GROUNDING_VARIANTS, (written, masked)):
      while len(pending) >= batch_size:
        run(variant, pending[:batch_size])
        del pending[:batch_size]
  for variant, pending in zip(GROUNDING_VARIANTS, (written, masked)):
    if pending:
      run(variant, pending)
  if not tally.base["colour"] or not tally.base["shape"]:
    raise PredictError(f"no colour or shape words found in the captions of {num_images} {split} images")

  base = {k: float(np.mean(v)) if v else float("nan") for k, v in tally.base.items()}
  report: dict[str, Any] = dict(
      checkpoint=str(predictor.workdir),
      step=int(predictor.step),
      task=predictor.task,
      split=split,
      num_images=num_images,
      captions_per_image=captions_per_image,
      words={k: len(v) for k, v in tally.base.items()},
      object_pixel_share=base,
      default_mode=modes[0][0],
      # Share of the word's attention that goes to pixels at all (the rest stays on the text), default mode.
      pixel_attention={
          v: {k: float(np.mean(m)) for k, m in by_kind.items() if m} for v, by_kind in tally.pixel_mass.items()
      },
      variants={},
  )
  for variant, by_mode in tally.shares.items():
    report["variants"][variant] = {
        name: {
            kind: dict(share=float(np.nanmean(values)), ratio=float(np.nanmean(values)) / base[kind])
            for kind, values in by_kind.items()
            if values
        }
        for name, by_kind in by_mode.items()
    }
  return report


def grounding_table(report: dict[str, Any]) -> str:
  """The report as Markdown: a header line, then per mode the share on the object (x the object's pixel
  share) of colour and shape words as written and masked, and of the other words (control)."""
  base = report["object_pixel_share"]
  lines = [
      f"checkpoint {report['checkpoint']} (step {report['step']}, task {report['task']}): "
      f"{report['num_images']} {report['split']} images, {report['words']['colour']} colour, "
      f"{report['words']['shape']} shape and {report['words']['other']} other words; the object's share of "
      f"the feature pixels: colour {base['colour']:.3f}, shape {base['shape']:.3f}, all objects (other words) "
      f"{base['other']:.3f}. Share of the word's pixel attention on the object's pixels (x that share):",
      "",
      "| attention | colour | shape | colour, masked | shape, masked | other words (control) |",
      "|---|---|---|---|---|---|",
  ]
  variants = report["variants"]
  columns = [
      ("as written", "colour"),
      ("as written", "shape"),
      ("masked", "colour"),
      ("masked", "shape"),
      ("as written", "other"),
  ]
  for name in variants[GROUNDING_VARIANTS[0]]:
    cells = []
    for v, k in columns:
      e = variants[v][name].get(k)
      cells.append(f"{e['share']:.3f} ({e['ratio']:.1f}x)" if e else "-")
    lines.append(f"| {name}{' (default)' if name == report['default_mode'] else ''} | " + " | ".join(cells) + " |")
  mass = report["pixel_attention"]
  lines += [
      "",
      f"Share of the word's attention on pixels at all ({report['default_mode']}): "
      + ", ".join(
          f"{k}{', masked' if v == 'masked' else ''} {mass[v][k]:.2f}"
          for v in GROUNDING_VARIANTS
          for k in KINDS
          if k in mass.get(v, {})
      ),
  ]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixelbert_jax.visualize", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="training workdir, its checkpoints/ or a step folder")
  parser.add_argument("--image")
  parser.add_argument("--text")
  parser.add_argument("--out", help="output folder (the pictures; the grounding check's grounding.json)")
  parser.add_argument("--words", nargs="+", help="only these words of the text (default: all)")
  parser.add_argument("--layer", type=int, default=-1, help="0-based; negative counts from the last (default)")
  parser.add_argument("--head", type=int, default=None, help="one head (default: the mean over heads)")
  parser.add_argument("--rollout", action="store_true", help="attention rollout through layers 0..--layer")
  parser.add_argument("--nearest", action="store_true", help="draw each feature pixel as a flat 64x64 block")
  parser.add_argument(
      "--grounding_check",
      action="store_true",
      help="synthetic-world checkpoints: attention share on the named object, held-out scenes",
  )
  parser.add_argument("--num_images", type=int, default=200)
  parser.add_argument("--captions_per_image", type=int, default=5)
  parser.add_argument("--split", default="val", choices=("val", "test"))
  parser.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  args = parser.parse_args(argv)
  if not args.grounding_check and (args.image is None or args.text is None or args.out is None):
    parser.error("--image, --text and --out are required (unless --grounding_check)")

  def body() -> dict | None:
    predictor = Predictor(args.checkpoint)
    if not args.grounding_check:
      return visualize(
          predictor,
          args.image,
          args.text,
          args.out,
          words=args.words,
          layer=args.layer,
          head=args.head,
          use_rollout=args.rollout,
          nearest=args.nearest,
      )
    report = grounding_check(predictor, args.num_images, args.split, args.captions_per_image)
    if args.out:
      out = epath.Path(paths.resolve(args.out))
      out.mkdir(parents=True, exist_ok=True)
      (out / "grounding.json").write_text(json.dumps(report, indent=2) + "\n")
    print(grounding_table(report))
    return None

  # OSError: an output folder that cannot be written
  return cli_errors.run_command(
      body, usage_errors=(PredictError, ckpt_lib.CheckpointMismatchError, OSError), verbose=args.verbose
  )


if __name__ == "__main__":
  sys.exit(main())
