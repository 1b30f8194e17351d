"""Where each word looks: heat maps of Pixel-BERT's text->pixel attention over the image, word by word.

  python -m pixelbert_jax.visualize --checkpoint WORKDIR --image IMG --text "a red star" --out DIR \
      [--words red star] [--layer L] [--head H] [--rollout] [--nearest]

attention.py says how a word's map is read off the model (the default mode, `--layer`, `--head`,
`--rollout`); drawing.py draws it. DIR gets `NN_word.png` per word (the image under the upsampled map, the
word and its score, i.e. the share of the word's attention that goes to pixels at all, printed on it),
`grid.png` (the image and every word), `attention.npy` (float32 [layers, heads, T, T]: every layer's and
head's attention, T = text tokens + pixels), `maps.npy` (float32 [words, gh, gw]: each word's attention to
the pixel grid, as drawn) and `summary.json`. Any task's checkpoint works.
Python: `visualize(AttentionMaps(WORKDIR), image_path, text, out_dir, words=..., layer=..., ...)`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Sequence

import numpy as np
from etils import epath
from PIL import Image

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import cli_errors, drawing, paths
from pixelbert_jax.attention import AttentionMaps
from pixelbert_jax.predict import PredictError


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
    attention: AttentionMaps,
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
  got = attention.maps(image_path, text, words, layer, head, use_rollout)
  out = epath.Path(paths.resolve(out_dir))
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PredictError(f"cannot create the output folder {out_dir}: {e}") from e
  _remove_previous_pictures(out)
  h, w = drawing.output_size(*got["image"].shape[:2])
  picture = (
      np.asarray(Image.fromarray(got["image"]).resize((w, h), Image.BICUBIC))
      if (h, w) != got["image"].shape[:2]
      else got["image"]
  )
  tiles = [drawing.label(Image.fromarray(picture), "image")]
  summary = got["summary"]
  for k, (word, grid_map, entry) in enumerate(zip(got["words"], got["maps"], summary["words"])):
    heat = drawing.upsample(grid_map, tuple(got["bucket"]), got["valid_hw"], (h, w), nearest)
    tile = drawing.overlay(picture, heat, f"{word}  {entry['pixel_attention']:.2f}")
    name = f"{k:02d}_{drawing.file_word(word)}.png"
    tile.save(str(out / name))
    entry["file"] = name
    tiles.append(tile)
  drawing.grid_picture(tiles, f"{summary['text']}  ({summary['mode']})").save(str(out / "grid.png"))
  np.save(str(out / "attention.npy"), got["probs"])
  np.save(str(out / "maps.npy"), got["maps"])
  summary["files"] = dict(grid="grid.png", attention="attention.npy", maps="maps.npy")
  summary["out_dir"] = str(out)
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixelbert_jax.visualize", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="training workdir, its checkpoints/ or a step folder")
  parser.add_argument("--image", required=True)
  parser.add_argument("--text", required=True)
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--words", nargs="+", help="only these words of the text (default: all)")
  parser.add_argument("--layer", type=int, default=-1, help="0-based; negative counts from the last (default)")
  parser.add_argument("--head", type=int, default=None, help="one head (default: the mean over heads)")
  parser.add_argument("--rollout", action="store_true", help="attention rollout through layers 0..--layer")
  parser.add_argument("--nearest", action="store_true", help="draw each feature pixel as a flat 64x64 block")
  parser.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  args = parser.parse_args(argv)

  def body() -> dict:
    return visualize(
        AttentionMaps(args.checkpoint),
        args.image,
        args.text,
        args.out,
        words=args.words,
        layer=args.layer,
        head=args.head,
        use_rollout=args.rollout,
        nearest=args.nearest,
    )

  # OSError: an output folder that cannot be written
  return cli_errors.run_command(
      body, usage_errors=(PredictError, ckpt_lib.CheckpointMismatchError, OSError), verbose=args.verbose
  )


if __name__ == "__main__":
  sys.exit(main())
