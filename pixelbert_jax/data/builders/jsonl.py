"""Custom data as JSON lines: every <split>.jsonl in manual_dir becomes split <split>.

One builder, `jsonl`, with two configs: 'captions' (captions schema) and 'vqa' (vqa schema), read back as
`tfds.data_source("jsonl/captions", data_dir=...)`.

Captions lines: {"image": path, "caption": str} or {"image": path, "captions": [str, ...]}, "image_id"?.
Lines naming the same image (the same image_id; by default the path as written) become one record with all
their captions: retrieval evaluates each image once, and a caption of a repeated image would otherwise count
as wrong for its twin.
VQA lines: {"image": path, "question": str, "answers": [str, ...], "question_id"?: int, "image_id"?,
"question_type"?, "answer_type"?}. Any number of answers from 1 (tasks/vqa_eval.py scores 10 answers by the
official metric, other numbers by our rule); a file where no line has answers (a test split) leaves them out
or empty on every line. image_id may be a string or an integer (stored as its string).

Image paths are relative to the .jsonl file's folder, or absolute, and must lie inside that folder (link a
folder of images kept elsewhere into it): a path that leaves it is most often one written relative to
another folder. Mistakes stop the build with one line naming the file, the line and the key. Each image
file is stored once per build however many lines (and splits) name it (layout.py); a file named
images.jsonl is refused, as `images` is the image table's split.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any, Iterator

import tensorflow_datasets as tfds

from pixelbert_jax.data.builders import _common as c
from pixelbert_jax.data.builders import _read as read
from pixelbert_jax.data.builders import layout
from pixelbert_jax.data.preprocess import BadImageError
from pixelbert_jax.data.schemas import SCHEMAS

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")


def jsonl_splits(manual_dir: str, hint: str) -> dict[str, str]:
  """split name -> file, for each *.jsonl in manual_dir."""
  files = sorted(glob.glob(os.path.join(manual_dir, "*.jsonl")))
  if not files:
    raise FileNotFoundError(f"no *.jsonl file in {manual_dir}. {hint}")
  splits = {}
  for path in files:
    name = os.path.splitext(os.path.basename(path))[0]
    if not _SPLIT_NAME.fullmatch(name):
      raise ValueError(
          f"{path}: a split is named after its file, and {name!r} is not a valid split name "
          "(letters, digits and _ only)"
      )
    if name == layout.IMAGES_SPLIT:
      raise ValueError(
          f"{path}: a split is named after its file, and {name!r} is the name of the build's image table; "
          "rename the file"
      )
    splits[name] = path
  return splits


INSTRUCTIONS = {
    "captions": """
  Put into manual_dir one <split>.jsonl per split (e.g. train.jsonl, val.jsonl), each line
    {"image": "path/inside/manual_dir.jpg", "caption": "a sentence"}   or   {"image": ..., "captions": [...]}
  with an optional "image_id" (default: the image path as written); lines of the same image are merged.
  """,
    "vqa": """
  Put into manual_dir one <split>.jsonl per split, each line
    {"image": "path.jpg", "question": "what colour is the cat?", "answers": ["black", "black", "grey"]}
  with optional "question_id" (int, default: the line number), "image_id", "question_type", "answer_type".
  Any number of answers from 1; an unannotated split (test) has none on every line.
  """,
}


class Jsonl(c.ManualBuilder):
  """Your own image-text data as JSON lines; config 'captions' or 'vqa' picks the schema."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Original encoded images, texts as given (stripped).",
      "2.0.0": "Layout 2: each image stored once (split 'images'), records point at it.",
  }
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="captions", description="captions schema"),
      tfds.core.BuilderConfig(name="vqa", description="vqa schema"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "config captions:" + INSTRUCTIONS["captions"] + "config vqa:" + INSTRUCTIONS["vqa"]

  def _info(self) -> tfds.core.DatasetInfo:
    features = SCHEMAS[self.builder_config.name].features()  # the config is named after its schema
    return self.dataset_info(features)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual_dir = self.manual_path(dl_manager)
    files = jsonl_splits(manual_dir, INSTRUCTIONS[self.builder_config.name])
    table = self.start_table(manual_dir)
    splits = {}
    for split, path in files.items():  # validate every file before writing anything
      lines = self._read(path)
      for _, image_path, _, _ in lines:
        table.add(image_path)
      splits[split] = self._generate_examples(split, path, lines)
    return self.with_table(splits)

  def _read(self, path: str) -> list[tuple[int, str, str, dict]]:
    schema = self.builder_config.name
    folder = os.path.dirname(path)
    lines = []
    for line_no, rec in read.iter_json_lines(path):
      where = f"line {line_no}"
      image = read.field(rec, "image", str, file=path, where=where)
      image_path = image_inside(folder, image, file=path, where=where)
      image_id = read.field(rec, "image_id", (str, int), file=path, where=where, default=image)
      fields = parse_captions(rec, path, where) if schema == "captions" else parse_vqa(rec, path, line_no)
      lines.append((line_no, image_path, str(image_id), fields))
    if schema == "vqa":
      check_vqa_file(lines, path)
    else:
      lines = merge_images(lines, path)
    return lines

  def _generate_examples(self, split: str, path: str, lines: list) -> Iterator[tuple[int, dict]]:
    schema = self.builder_config.name

    def make(line: tuple[int, str, str, dict], tally: c.BadRecordTally) -> dict | None:
      line_no, image_path, image_id, fields = line
      name = f"{path}: record line {line_no}"
      fields = finish_captions(fields, tally, name) if schema == "captions" else finish_vqa(fields, tally, name)
      if fields is None:
        return None
      try:
        row, height, width = self.table.row(image_path)
      except BadImageError as e:  # the skip warning names the key as well as the file and line
        raise BadImageError(f"key 'image': {e}") from e
      return {"image_index": row, "image_id": image_id, "height": height, "width": width, **fields}

    return self.records(split, [(f"{path}: record line {line[0]}", line) for line in lines], make)


def image_inside(folder: str, image: str, *, file: str, where: str) -> str:
  """The path of `image` (relative to `folder`, or absolute), checked to name a file inside `folder`."""
  if not image.strip():
    raise read.RecordError(
        f"{file}: record {where}: key 'image' is empty; it names the image file, relative to " f"{folder}"
    )
  full = os.path.normpath(os.path.join(os.path.abspath(folder), image))  # join keeps an absolute path as it is
  if not (_within(full, os.path.abspath(folder)) or _within(os.path.realpath(full), os.path.realpath(folder))):
    raise read.RecordError(
        f"{file}: record {where}: key 'image' {image!r} is outside the folder {folder} of this "
        "file; image paths are relative to it and stay inside it (move the images there, or link "
        "their folder into it)"
    )
  return full


def _within(path: str, folder: str) -> bool:
  # Lexical, after normpath: a folder of images linked into the data folder counts as inside it.
  return os.path.commonpath([path, os.path.normpath(folder)]) == os.path.normpath(folder)


def check_vqa_file(lines: list[tuple[int, str, str, dict]], path: str) -> None:
  """Unique question ids; either every question has answers (train, val) or none has (a test split)."""
  seen: set[int] = set()
  for line_no, _, _, fields in lines:
    read.check_unique(seen, fields["question_id"], file=path, where=f"line {line_no}", what="question_id")
  annotated = [line_no for line_no, _, _, fields in lines if fields["answers"]]
  if annotated and len(annotated) != len(lines):
    line_no = next(n for n, _, _, fields in lines if not fields["answers"])
    raise read.RecordError(
        f"{path}: record line {line_no}: key 'answers' is missing or empty, while other questions "
        f"of this file have answers (e.g. line {annotated[0]}): give each question at least one "
        "(only a split without any answers, like a test split, leaves them out)"
    )


def merge_images(lines: list[tuple[int, str, str, dict]], path: str) -> list[tuple[int, str, str, dict]]:
  """Caption lines of one image_id -> one record (at its first line) with their captions in line order."""
  merged: dict[str, tuple[int, str, str, dict]] = {}
  for line_no, image_path, image_id, fields in lines:
    first = merged.get(image_id)
    if first is None:
      merged[image_id] = (line_no, image_path, image_id, {"captions": list(fields["captions"])})
      continue
    if first[1] != image_path:
      raise read.RecordError(
          f"{path}: record line {line_no}: key 'image_id' {image_id!r} names image {image_path}, "
          f"but line {first[0]} gave it to {first[1]}: an image_id is one image"
      )
    first[3]["captions"].extend(fields["captions"])
  return list(merged.values())


def parse_captions(rec: dict, path: str, where: str) -> dict:
  if ("caption" in rec) == ("captions" in rec):
    raise read.RecordError(
        f"{path}: record {where}: needs exactly one of the keys 'caption' and 'captions', " f"got keys {sorted(rec)}"
    )
  if "caption" in rec:
    return {"captions": [read.field(rec, "caption", str, file=path, where=where)]}
  return {"captions": read.str_list(rec, "captions", file=path, where=where)}


def finish_captions(fields: dict, tally: c.BadRecordTally, name: str) -> dict | None:
  captions = c.clean_texts(fields["captions"], tally=tally, name=name)
  if not captions:
    tally.skip(name, "no non-empty caption")
    return None
  return {"captions": captions}


def parse_vqa(rec: dict, path: str, line_no: int) -> dict:
  where = f"line {line_no}"
  answers = list(read.str_list(rec, "answers", file=path, where=where, default=[]))
  for i, answer in enumerate(answers):
    if not answer.strip():
      raise read.RecordError(f"{path}: record {where}: key 'answers'[{i}] is blank; every answer is some text")
  return {
      "question": read.field(rec, "question", str, file=path, where=where),
      "answers": answers,
      "question_id": read.field(rec, "question_id", int, file=path, where=where, default=line_no),
      "question_type": read.field(rec, "question_type", str, file=path, where=where, default=""),
      "answer_type": read.field(rec, "answer_type", str, file=path, where=where, default=""),
  }


def finish_vqa(fields: dict, tally: c.BadRecordTally, name: str) -> dict | None:
  question = fields["question"].strip()
  if not question:
    tally.skip(name, "empty question")
    return None
  return {**fields, "question": question}
