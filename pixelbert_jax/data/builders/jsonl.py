"""Custom data as JSON lines: every <split>.jsonl in manual_dir becomes split <split>.

Captions lines: {"image": path, "caption": str} or {"image": path, "captions": [str, ...]}, "image_id"?.
VQA lines: {"image": path, "question": str, "answers": [str, ...], "question_id"?: int, "image_id"?,
"question_type"?, "answer_type"?}. Image paths are relative to the .jsonl file's folder (or absolute).
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any, Iterator

import tensorflow_datasets as tfds

from pixelbert_jax.data.builders import _common as c

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
      raise ValueError(f"{path}: a split is named after its file, and {name!r} is not a valid split name "
                       "(letters, digits and _ only)")
    splits[name] = path
  return splits


class _JsonlBuilder(c.ManualBuilder, skip_registration=True):
  """One split per .jsonl file; subclasses turn a validated line into an example."""

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    files = jsonl_splits(self.manual_path(dl_manager), self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    return {split: self._generate_examples(split, path) for split, path in files.items()}

  def _generate_examples(self, split: str, path: str) -> Iterator[tuple[str, dict]]:
    tally = self.tally(split)
    folder = os.path.dirname(path)
    lines = []
    for line_no, rec in c.iter_json_lines(path):  # validate the whole file before writing anything
      where = f"line {line_no}"
      image = c.field(rec, "image", str, file=path, where=where)
      image_path = os.path.join(folder, image)  # join keeps an absolute path as it is
      image_id = c.field(rec, "image_id", str, file=path, where=where, default=image)
      lines.append((line_no, image_path, image_id, self.parse(rec, path, where)))
    self.check_lines(lines, path)

    def make(line: tuple[int, str, str, dict]) -> tuple[str, dict] | None:
      line_no, image_path, image_id, fields = line
      fields = self.finish_fields(fields, tally=tally, name=f"{path}:{line_no}")
      if fields is None:
        return None
      data, height, width = self.images.read(image_path)
      return f"{line_no}", {"image": data, "image_id": image_id, "height": height, "width": width, **fields}

    return c.generate(((f"{path}:{line[0]} ({line[1]})", line) for line in lines), make, tally)

  def parse(self, rec: dict, path: str, where: str) -> dict:
    raise NotImplementedError

  def check_lines(self, lines: list, path: str) -> None:
    """Cross-line checks (unique ids)."""

  def finish_fields(self, fields: dict, *, tally: c.BadRecordTally, name: str) -> dict | None:
    return fields


class JsonlCaptions(_JsonlBuilder):
  """Image-caption pairs from JSON lines, captions schema."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original encoded images, captions as given (stripped)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into manual_dir one <split>.jsonl per split (e.g. train.jsonl, val.jsonl), each line
    {"image": "relative/or/absolute/path.jpg", "caption": "a sentence"}   or   {"image": ..., "captions": [...]}
  with an optional "image_id" (default: the image path as written).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=c.captions_features(), description=self.__doc__)

  def parse(self, rec: dict, path: str, where: str) -> dict:
    if ("caption" in rec) == ("captions" in rec):
      raise c.RecordError(f"{path}: record {where}: needs exactly one of the keys 'caption' and 'captions', "
                          f"got keys {sorted(rec)}")
    if "caption" in rec:
      return {"captions": [c.field(rec, "caption", str, file=path, where=where)]}
    return {"captions": c.str_list(rec, "captions", file=path, where=where)}

  def finish_fields(self, fields: dict, *, tally: c.BadRecordTally, name: str) -> dict | None:
    captions = c.clean_texts(fields["captions"], tally=tally, name=name)
    if not captions:
      tally.skip(name, "no non-empty caption")
      return None
    return {"captions": captions}


class JsonlVqa(_JsonlBuilder):
  """Questions with answers about images from JSON lines, vqa schema (answers may be empty for test)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original encoded images, answers as given."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into manual_dir one <split>.jsonl per split, each line
    {"image": "path.jpg", "question": "what colour is the cat?", "answers": ["black", "black", "grey"]}
  with optional "question_id" (int, default: the line number), "image_id", "question_type", "answer_type".
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=c.vqa_features(), description=self.__doc__)

  def parse(self, rec: dict, path: str, where: str) -> dict:
    line_no = int(where.split()[-1])
    return {"question": c.field(rec, "question", str, file=path, where=where),
            "answers": c.str_list(rec, "answers", file=path, where=where),
            "question_id": c.field(rec, "question_id", int, file=path, where=where, default=line_no),
            "question_type": c.field(rec, "question_type", str, file=path, where=where, default=""),
            "answer_type": c.field(rec, "answer_type", str, file=path, where=where, default="")}

  def check_lines(self, lines: list, path: str) -> None:
    seen: set[int] = set()
    for line_no, _, _, fields in lines:
      c.check_unique(seen, fields["question_id"], file=path, where=f"line {line_no}", what="question_id")

  def finish_fields(self, fields: dict, *, tally: c.BadRecordTally, name: str) -> dict | None:
    question = fields["question"].strip()
    if not question:
      tally.skip(name, "empty question")
      return None
    return {**fields, "question": question}
