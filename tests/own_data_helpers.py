"""A user's own data at test size: a folder of tiny generated JPEGs, captions and VQA JSON-lines files, and a
tiny BERT-style vocab.txt (nothing is downloaded)."""

from __future__ import annotations

import json
import os

from pixelbert_jax.data import text
from tests import fixtures_real as fx

COLOURS = ("red", "green", "blue", "yellow", "black", "white")
WORDS = (
    "what",
    "colour",
    "is",
    "the",
    "picture",
    "a",
    "an",
    "photo",
    "of",
    "square",
    "plain",
    "thing",
    "dark",
    "light",
    "grey",
    "how",
    "many",
    "?",
    ".",
) + COLOURS


def write_vocab(directory: str) -> str:
  """vocab.txt with BERT's special tokens and the words the files below use."""
  return text.write_world_vocab(directory, WORDS)


def write_images(folder: str, count: int) -> list[str]:
  """`count` small JPEGs of different sizes and colours, named 0.jpg, 1.jpg, ... in `folder`."""
  names = []
  for i in range(count):
    name = f"{i}.jpg"
    fx.write_image(os.path.join(folder, name), 40 + 4 * (i % 3), 56 + 8 * (i % 2), seed=i)
    names.append(name)
  return names


def _lines(path: str, records: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def vqa_records(image_dir: str, answer_counts: list[int], *, offset: int = 0) -> list[dict]:
  """One question per image with the given number of answers; a three-answer question has two annotators
  agreeing and one not, so its two answers get different soft scores."""
  records = []
  for i, n in enumerate(answer_counts):
    colour = COLOURS[(i + offset) % len(COLOURS)]
    other = COLOURS[(i + offset + 1) % len(COLOURS)]
    answers = [colour] if n == 1 else ([colour] * (n - 1) + [other])
    records.append(
        {
            "image": f"{image_dir}/{i % 8}.jpg",
            "question": "what colour is the picture?",
            "answers": answers,
            "image_id": i % 8,
        }
    )  # an integer, as users write them
  return records


def write_vqa_folder(
    root: str, *, train_counts: list[int], val_counts: list[int], num_test: int = 0, images: bool = True
) -> str:
  """root/images/*.jpg (8 of them; not written when `images` is False), root/train.jsonl, root/val.jsonl:
  one question per line; with `num_test`, root/test.jsonl of questions without answers."""
  if images:
    write_images(os.path.join(root, "images"), 8)
  _lines(os.path.join(root, "train.jsonl"), vqa_records("images", train_counts))
  _lines(os.path.join(root, "val.jsonl"), vqa_records("images", val_counts, offset=3))
  if num_test:
    test = vqa_records("images", [1] * num_test, offset=5)
    _lines(os.path.join(root, "test.jsonl"), [{k: v for k, v in r.items() if k != "answers"} for r in test])
  return root


def write_captions_folder(root: str, *, num_train: int = 8, num_val: int = 6) -> str:
  """root/images/*.jpg; train.jsonl with one caption per line (an image's lines are merged into one record)
  and val.jsonl with a "captions" list per image."""
  write_images(os.path.join(root, "images"), max(num_train, num_val))
  train = []
  for i in range(num_train):
    colour = COLOURS[i % len(COLOURS)]
    train.append({"image": f"images/{i}.jpg", "caption": f"a {colour} picture"})
    train.append({"image": f"images/{i}.jpg", "caption": f"a plain {colour} square"})
  val = [
      {
          "image": f"images/{i}.jpg",
          "captions": [f"a photo of a {COLOURS[i % len(COLOURS)]} thing", f"the {COLOURS[i % len(COLOURS)]} picture"],
      }
      for i in range(num_val)
  ]
  _lines(os.path.join(root, "train.jsonl"), train)
  _lines(os.path.join(root, "val.jsonl"), val)
  return root
