"""The grounding check: do the attention maps land on the object a word names? On the synthetic world only.

  python -m pixelbert_jax.demo.grounding --checkpoint WORKDIR [--num_images 200] [--captions_per_image 5] \
      [--split val] [--out DIR]

It needs a checkpoint trained on the synthetic world: it regenerates held-out scenes from the checkpoint's
data config and reports, for the colour and shape words of their captions, the mean share of the word's
pixel attention that falls on the feature pixels of the object the word names, against that object's share
of the image's feature pixels, for every layer, head and rollout (attention.py reads the maps). It prints a
Markdown table and, with --out, writes DIR/grounding.json.
Python: `grounding_check(AttentionMaps(WORKDIR), num_images=...)`, `grounding_table(report)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np
from etils import epath

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import cli_errors, paths
from pixelbert_jax.attention import AttentionMaps, attention_matrix, valid_size
from pixelbert_jax.data import builders
from pixelbert_jax.data import synthetic as world
from pixelbert_jax.data import text as text_lib
from pixelbert_jax.data.preprocess import decode_image
from pixelbert_jax.models.pixel_bert import CELL
from pixelbert_jax.predict import PredictError, Predictor

KINDS = ("colour", "shape", "other")  # other: the caption's remaining words, against all objects (a control)
GROUNDING_VARIANTS = ("as written", "masked")  # the word itself, or [MASK] in its place (what MLM asks)


def object_share(attention: np.ndarray, on_object: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Share of a word's pixel attention that falls on the object's feature pixels.

  attention float [..., P] (a word's attention to the pixel tokens), on_object / valid bool [..., P]
  -> [...] = sum(attention on valid object pixels) / sum(attention on valid pixels); nan with no attention."""
  a = np.asarray(attention, np.float64) * np.asarray(valid, bool)
  total = a.sum(axis=-1)
  hit = (a * np.asarray(on_object, bool)).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, hit / np.where(total > 0, total, 1.0), np.nan)


def object_pixels(obj, scale: float, grid: tuple[int, int]) -> np.ndarray:
  """bool [gh*gw]: the feature pixels whose 64x64 cell meets the object's bounding box (row-major).

  `scale` maps world pixels to the resized image (1 when the world's image size is the bucket's)."""
  cx, cy = obj.center
  x0, x1 = (cx - obj.radius) * scale, (cx + obj.radius) * scale
  y0, y1 = (cy - obj.radius) * scale, (cy + obj.radius) * scale
  rows = (np.arange(grid[0]) * CELL < y1) & ((np.arange(grid[0]) + 1) * CELL > y0)
  cols = (np.arange(grid[1]) * CELL < x1) & ((np.arange(grid[1]) + 1) * CELL > x0)
  return (rows[:, None] & cols[None, :]).reshape(-1)


def _grounding_examples(predictor: Predictor, split: str, num_images: int, captions_per_image: int):
  """Yields one (image [1,H,W,3], mask [1,H,W], ids [L], text_mask [L], words) per caption of each held-out
  scene, regenerated exactly as the dataset stored it (JPEG included); words: (token mask [L], kind, the
  feature pixels [P] of the object the word names or of all objects for the other words, the named object's
  pixels (for another word: a random object's), the image's other objects' pixels or None)."""
  c = predictor.data_cfg
  s = c.synthetic
  spec = builders.scene_spec(c)
  max_len = int(c.max_text_len)
  for i in range(num_images):
    objs = world.make_scene(int(s.seed), split, i, int(s.image_size), spec)
    pick_rng = np.random.default_rng([int(s.seed), i])  # the object a control word is measured against
    jpeg = world.encode_jpeg(world.render(int(s.seed), split, i, objs, int(s.image_size)))
    image, mask = predictor.model_image(decode_image(jpeg, name=f"synthetic-{split}-{i}"))
    grid = (image.shape[1] // CELL, image.shape[2] // CELL)
    scale = valid_size(mask[0])[1] / int(s.image_size)
    cells = [object_pixels(o, scale, grid) for o in objs]
    for caption, _ in world.captions(int(s.seed), split, i, objs, captions_per_image):
      words = []
      for wi, word in enumerate(caption.split()):
        kind = "colour" if word in world.COLOURS else "shape" if word in world.SHAPES else "other"
        named = [k for k, o in enumerate(objs) if word in (o.colour, o.shape)]
        if kind != "other" and len(named) != 1:  # colours and shapes are unique within a scene
          continue
        _, _, token_mask = text_lib.encode(predictor.tokenizer, caption, max_len, grounded_words=[wi])
        if not token_mask.any():
          continue
        # binding: the named object against the image's other objects (a control word: one chosen at random)
        pick = named[0] if named else int(pick_rng.integers(len(objs)))
        others = np.any([c for k, c in enumerate(cells) if k != pick], axis=0) & ~cells[pick] if len(objs) > 1 else None
        words.append((token_mask, kind, cells[named[0]] if named else np.any(cells, axis=0), cells[pick], others))
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


class _Tally:
  """Shares by variant, mode and kind; the object's pixel share and the attention on pixels at all by kind."""

  def __init__(self, modes):
    self.modes = modes
    self.shares = {v: {m[0]: {k: [] for k in KINDS} for m in modes} for v in GROUNDING_VARIANTS}
    self.pixel_mass = {v: {k: [] for k in KINDS} for v in GROUNDING_VARIANTS}
    self.base = {k: [] for k in KINDS}
    # per feature pixel: the share on the named object and the share on the image's other objects
    self.binding = {v: {m[0]: {k: ([], []) for k in KINDS} for m in modes} for v in GROUNDING_VARIANTS}

  def add(self, variant: str, probs: np.ndarray, pixel_mask: np.ndarray, rows: list) -> None:
    """probs [B, layers, heads, T, T]; rows: (batch index, token mask [L], kind, object pixels [P], named
    object's pixels [P], other objects' pixels [P] or None)."""
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
      for row, attn, ok in zip(rows, to_pixels, valid):
        if row[5] is not None:
          named, others = row[4] & ok, row[5] & ok
          pair = self.binding[variant][name][row[2]]
          pair[0].append(float(object_share(attn, named, ok) / max(named.sum(), 1)))
          pair[1].append(float(object_share(attn, others, ok) / max(others.sum(), 1)))
      if name == self.modes[0][0]:
        for kind, mass in zip(kinds, to_pixels.sum(axis=1)):
          self.pixel_mass[variant][kind].append(float(mass))
    if variant == GROUNDING_VARIANTS[0]:
      for kind, obj, ok in zip(kinds, on_object, valid):
        self.base[kind].append(float((obj & ok).sum() / ok.sum()))


def grounding_check(
    attention: AttentionMaps,
    num_images: int = 200,
    split: str = "val",
    captions_per_image: int = 5,
    batch_size: int = 32,
) -> dict[str, Any]:
  """Mean share of colour / shape words' pixel attention on the named object's feature pixels, against the
  object's share of the valid feature pixels, on `num_images` regenerated scenes of `split`.

  Every mode (each layer's head mean, the rollout through each layer, each head) is measured for the word as
  written (one pass per caption) and for the word replaced by [MASK] (one pass per word: where the model looks
  to fill it in, as MLM asks). The caption's other words, against all of the scene's objects, are the control
  for attention that goes to objects whatever the word."""
  predictor = attention.predictor
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
  modes = _modes(attention.runner.num_layers, attention.runner.num_heads)
  mask_id = int(predictor.tokenizer.convert_tokens_to_ids("[MASK]"))
  tally = _Tally(modes)

  def run(variant, batch):  # batch: (image, mask, ids, text_mask, rows)
    probs, pixel_mask = attention(
        np.concatenate([b[0] for b in batch]),
        np.concatenate([b[1] for b in batch]),
        np.stack([b[2] for b in batch]),
        np.stack([b[3] for b in batch]),
    )
    tally.add(variant, probs, pixel_mask, [(k, *row) for k, b in enumerate(batch) for row in b[4]])

  written, masked = [], []
  for image, mask, ids, tmask, words in _grounding_examples(predictor, split, num_images, captions_per_image):
    written.append((image, mask, ids, tmask, words))
    for word in words:
      token_mask, kind = word[:2]
      if kind != "other":
        masked.append((image, mask, np.where(token_mask > 0, mask_id, ids).astype(ids.dtype), tmask, [word]))
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
  # Binding (scenes with more than one object): per feature pixel, the share on the named object over the
  # share on the image's other objects; about 1 for words that do not tell the objects apart.
  report["binding"] = {
      variant: {
          name: {
              kind: dict(named=float(np.mean(a)), others=float(np.mean(b)), ratio=float(np.mean(a) / np.mean(b)))
              for kind, (a, b) in by_kind.items()
              if a
          }
          for name, by_kind in by_mode.items()
      }
      for variant, by_mode in tally.binding.items()
  }
  report["binding_words"] = {k: len(v[0]) for k, v in tally.binding[GROUNDING_VARIANTS[0]][modes[0][0]].items()}
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
  if any(report.get("binding_words", {}).values()):
    n = report["binding_words"]
    lines += [
        "",
        f"Binding, on the images with more than one object ({n['colour']} colour, {n['shape']} shape and "
        f"{n['other']} other words): per feature pixel, the share on the named object over the share on the "
        "image's other objects (other words: a random object of the image; about 1 when the word does not tell "
        "the objects apart):",
        "",
        "| attention | colour | shape | colour, masked | shape, masked | other words (control) |",
        "|---|---|---|---|---|---|",
    ]
    binding = report["binding"]
    for name in binding[GROUNDING_VARIANTS[0]]:
      cells = [binding[v][name].get(k) for v, k in columns]
      text = " | ".join(f"{e['ratio']:.1f}x" if e else "-" for e in cells)
      lines.append(f"| {name}{' (default)' if name == report['default_mode'] else ''} | {text} |")
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


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixelbert_jax.demo.grounding", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="training workdir, its checkpoints/ or a step folder")
  parser.add_argument("--num_images", type=int, default=200)
  parser.add_argument("--captions_per_image", type=int, default=5)
  parser.add_argument("--split", default="val", choices=("val", "test"))
  parser.add_argument("--out", help="output folder for grounding.json (default: print the table only)")
  parser.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  args = parser.parse_args(argv)

  def body() -> None:
    report = grounding_check(AttentionMaps(args.checkpoint), args.num_images, args.split, args.captions_per_image)
    if args.out:
      out = epath.Path(paths.resolve(args.out))
      out.mkdir(parents=True, exist_ok=True)
      (out / "grounding.json").write_text(json.dumps(report, indent=2) + "\n")
    print(grounding_table(report))

  # OSError: an output folder that cannot be written
  return cli_errors.run_command(
      body, usage_errors=(PredictError, ckpt_lib.CheckpointMismatchError, OSError), verbose=args.verbose
  )


if __name__ == "__main__":
  sys.exit(main())
