"""Inference from a training workdir: answer a question, score a caption, rank captions.

  python -m pixelbert_jax.predict --checkpoint WORKDIR --image PATH --question "what color is the star"
  python -m pixelbert_jax.predict --checkpoint WORKDIR --image PATH --caption "a red star"
  python -m pixelbert_jax.predict --checkpoint WORKDIR --image PATH --captions "a red star" "a blue ring"

The checkpoint's `meta` item says its task: VQA checkpoints answer questions; retrieval checkpoints (score
from the retrieval head) and pre-training checkpoints (image-text matching probability) score and rank
captions. Bad input gets a one-line `error: ...` naming the file, the text or the task, and exit code 2; any
other failure one `error:` line too, exit code 1 (the traceback with --verbose).
Python: `Predictor(WORKDIR).answer(path, question)`, `.score(path, caption)`, `.rank(path, captions)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from pixelbert_jax import checkpoint as ckpt_lib
from pixelbert_jax import cli_errors, model_context, partitioning, paths, task_table
from pixelbert_jax.data import pipeline, text
from pixelbert_jax.data.preprocess import BadImageError, decode_image, resize_and_pad

CAPTION_TASKS = ("retrieval", "pretrain")


class PredictError(ValueError):
  """Bad input to the predictor; the message is one line naming what was wrong."""


class Predictor:
  """A checkpoint's model for one image at a time: its ModelContext (model_context.py) on one device, the
  variables placed there, and the run's data config and tokenizer. `model_overrides`: model config values
  to change before the model is built, such as `attention_impl` (values that change no parameter shape;
  attention.py's reading of the attention is one user)."""

  def __init__(self, checkpoint: str, step: int | None = None, *, model_overrides: dict | None = None):
    checkpoint = paths.resolve(checkpoint)  # '~' and relative paths (paths.py)
    try:
      directory, _ = ckpt_lib.resolve_checkpoint_dir(checkpoint)
      variables, meta, self.step = ckpt_lib.load_model_variables(checkpoint, step)
    except FileNotFoundError as e:
      raise PredictError(str(e)) from e
    self.task = meta.get("task")
    if self.task not in task_table.TASKS or "model" not in meta:
      raise PredictError(f"checkpoint {checkpoint}: its meta item names no known task/model ({sorted(meta)})")
    config_path = directory.parent / "config.json"
    if not config_path.exists():
      raise PredictError(f"checkpoint {checkpoint}: no config.json beside it at {config_path}")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    # The checkpoint's own meta says its task and model: config.json is the workdir's newest run's, which a
    # rerun with another (shape-compatible) model config may have replaced.
    config.task, config.model = self.task, ml_collections.ConfigDict(meta["model"])
    config.model.update(model_overrides or {})
    self.workdir = directory.parent
    self.data_cfg = config.data
    # One device: one image at a time needs no more, and the arrays the methods pass in need no sharding.
    self.context = model_context.ModelContext(config, partitioning.make_mesh((1, 1, 1), jax.devices()[:1]))
    self.model = self.context.model
    placed = self.context.place_variables(variables, f"checkpoint {checkpoint}")
    self.variables = {k: v for k, v in placed.items() if v or k == "params"}
    self.tokenizer = pipeline.tokenizer(self.data_cfg)
    self._apply = jax.jit(
        self.model.apply, static_argnames=("train", "method"), compiler_options=self.context.compiler_options
    )
    self._answers: list[str] | None = None

  # -- inputs ------------------------------------------------------------------------------------------
  def decode(self, path: str) -> np.ndarray:
    """The image file as uint8 [h, w, 3], with one-line errors for a missing or unreadable file."""
    p = epath.Path(paths.resolve(path))
    if not p.exists():
      raise PredictError(f"image {path} does not exist")
    if not p.is_file():
      raise PredictError(f"image {path} is not a file")
    try:
      return decode_image(p.read_bytes(), name=str(path), max_pixels=int(self.data_cfg.max_image_pixels))
    except BadImageError as e:
      raise PredictError(f"image {path} is unreadable: {e}") from e

  def model_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [h, w, 3] -> (uint8 [1, H, W, 3], bool [1, H, W]): resized and padded into its bucket as the
    run's data pipeline does; the mask marks the image inside the padding."""
    c = self.data_cfg
    image, mask = resize_and_pad(
        image,
        short_side=int(c.image_short_side),
        long_side=int(c.image_long_side),
        buckets=[tuple(b) for b in c.buckets],
    )
    return image[None], mask[None]

  def encode_texts(self, sentences: Sequence[str], what: str = "text") -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (int32 token ids [N, L], text mask [N, L]) as training encodes them, L = data.max_text_len.
    `what` names them in the one-line error for no text or an empty one."""
    if not sentences:
      raise PredictError(f"no {what} given")
    ids, masks = [], []
    for s in sentences:
      if not isinstance(s, str) or not s.strip():
        raise PredictError(f"empty {what}: {s!r}")
      i, m, _ = text.encode(self.tokenizer, s.strip(), int(self.data_cfg.max_text_len))
      ids.append(i)
      masks.append(m)
    return np.stack(ids), np.stack(masks)

  def _need(self, tasks: Sequence[str], what: str) -> None:
    if self.task not in tasks:
      raise PredictError(
          f"checkpoint {self.workdir} is a {self.task!r} checkpoint; {what} needs one of "
          f"{', '.join(repr(t) for t in tasks)}"
      )

  def answer_vocab(self) -> list[str]:
    if self._answers is None:
      saved = self.workdir / "answer_vocab.json"
      self._answers = json.loads(saved.read_text()) if saved.exists() else pipeline.answer_vocab(self.data_cfg)
    return self._answers

  # -- predictions -------------------------------------------------------------------------------------
  def answer(self, image_path: str, question: str, top_k: int = 5) -> list[tuple[str, float]]:
    """Top answers with their sigmoid scores, best first."""
    self._need(("vqa",), "a question")
    image, mask = self.model_image(self.decode(image_path))
    ids, tmask = self.encode_texts([question], "question")
    logits = np.asarray(self._apply(self.variables, image, mask, ids, tmask)["vqa_logits"][0])
    vocab = self.answer_vocab()
    if len(vocab) != logits.shape[0]:
      raise PredictError(f"answer vocabulary has {len(vocab)} answers, the checkpoint's head {logits.shape[0]}")
    order = np.argsort(-logits, kind="stable")[:top_k]
    return [(vocab[i], float(jax.nn.sigmoid(logits[i]))) for i in order]

  def _scores(self, image_path: str, captions: Sequence[str]) -> np.ndarray:
    self._need(CAPTION_TASKS, "scoring captions")
    image, mask = self.model_image(self.decode(image_path))
    ids, tmask = self.encode_texts(captions, "caption")
    n = len(captions)
    images, masks = np.repeat(image, n, 0), np.repeat(mask, n, 0)
    out = self._apply(self.variables, images, masks, ids, tmask)
    if self.task == "retrieval":
      return np.asarray(out["retrieval_logits"])
    return np.asarray(jax.nn.log_softmax(out["itm_logits"])[:, 1])  # log p(match)

  def score(self, image_path: str, caption: str) -> dict[str, float]:
    """retrieval: the retrieval head's score (a logit; sigmoid only as a rough probability);
    pretrain: the image-text matching probability."""
    s = float(self._scores(image_path, [caption])[0])
    if self.task == "pretrain":
      return {"match_probability": float(np.exp(s))}
    return {"score": s, "match_probability": float(jax.nn.sigmoid(s))}

  def rank(self, image_path: str, captions: Sequence[str]) -> list[tuple[str, float, float]]:
    """(caption, score, softmax over the given captions), best first."""
    s = self._scores(image_path, list(captions))
    p = np.asarray(jax.nn.softmax(jnp.asarray(s)))
    order = np.argsort(-s, kind="stable")
    return [(captions[i], float(s[i]), float(p[i])) for i in order]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixelbert_jax.predict", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="training workdir, its checkpoints/ or a step folder")
  parser.add_argument("--image", required=True)
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--question")
  group.add_argument("--caption")
  group.add_argument("--captions", nargs="+")
  parser.add_argument("--top_k", type=int, default=5)
  parser.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  args = parser.parse_args(argv)

  def body() -> dict:
    predictor = Predictor(args.checkpoint)
    if args.question is not None:
      return {
          "answers": [{"answer": a, "score": s} for a, s in predictor.answer(args.image, args.question, args.top_k)]
      }
    if args.caption is not None:
      return predictor.score(args.image, args.caption)
    return {
        "ranking": [
            {"caption": c, "score": s, "probability": p} for c, s, p in predictor.rank(args.image, args.captions)
        ]
    }

  return cli_errors.run_command(
      body, usage_errors=(PredictError, ckpt_lib.CheckpointMismatchError), verbose=args.verbose
  )


if __name__ == "__main__":
  sys.exit(main())
