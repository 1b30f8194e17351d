"""VQA v2 from the official questions/annotations JSON files and COCO images; answers kept as given."""

from __future__ import annotations

import os
from typing import Any, Iterator

import tensorflow_datasets as tfds

from pixelbert_jax.data.builders import _common as c
from pixelbert_jax.data.builders import _read as read
from pixelbert_jax.data.schemas import SCHEMAS
from pixelbert_jax.data.vqa_answers import OFFICIAL_NUM_ANSWERS

# split -> (questions file, annotations file or None, image folder, image file prefix)
SPLIT_FILES = {
    "train": (
        "v2_OpenEnded_mscoco_train2014_questions.json",
        "v2_mscoco_train2014_annotations.json",
        "train2014",
        "COCO_train2014_",
    ),
    "val": (
        "v2_OpenEnded_mscoco_val2014_questions.json",
        "v2_mscoco_val2014_annotations.json",
        "val2014",
        "COCO_val2014_",
    ),
    "test": ("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015", "COCO_test2015_"),
    "test_dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", "COCO_test2015_"),
}


class Vqa2(c.ManualBuilder):
  """VQA v2: splits train, val, and with include_test_splits test / test_dev (no answers) when their question
  files are given. Each COCO image is stored once however many questions (and splits) name it."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Original encoded COCO images, raw answers, question and answer types.",
      "2.0.0": "Layout 2: each image stored once (split 'images'); test splits only with include_test_splits.",
  }
  TEST_SPLITS = ("test", "test_dev")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put into manual_dir (any subset of the splits; each split needs its questions file, train/val also their
  annotations file; test and test_dev are built only with --include_test_splits):
    v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
    v2_mscoco_{train2014,val2014}_annotations.json
    train2014/COCO_train2014_<12-digit id>.jpg, val2014/..., test2015/COCO_test2015_<12-digit id>.jpg
    (files named <12-digit id>.jpg in those folders are found too)
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(SCHEMAS["vqa"].features(), homepage="https://visualqa.org")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual_dir = self.manual_path(dl_manager)
    table = self.start_table(manual_dir)
    splits = {}
    for split, (questions, annotations, folder, prefix) in SPLIT_FILES.items():
      q_path = os.path.join(manual_dir, questions)
      if not os.path.isfile(q_path) or not self.wants(split, questions):
        continue
      a_path = annotations and read.require_file(
          os.path.join(manual_dir, annotations), hint=f"split {split} needs it beside {questions}."
      )
      records, paths = read_vqa(q_path, a_path), {}
      for r in records:  # an image has ~5 questions: look its file up once
        if r["image_id"] not in paths:
          paths[r["image_id"]] = table.add(locate(os.path.join(manual_dir, folder), prefix, r["image_id"]))
        r["path"] = paths[r["image_id"]]
      splits[split] = self._generate_examples(split, records)
    if not splits:
      left_out = " (test question files are there: pass --include_test_splits)" if self._left_out else ""
      raise FileNotFoundError(
          f"no VQA v2 questions file found in {manual_dir}{left_out}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    return self.with_table(splits)

  def _generate_examples(self, split: str, records: list[dict]) -> Iterator[tuple[int, dict]]:
    def make(rec: dict, tally: c.BadRecordTally) -> dict | None:
      if not rec["question"].strip():
        tally.skip(f"question {rec['question_id']}", "empty question")
        return None
      row, height, width = self.table.row(rec["path"])
      return {
          "image_index": row,
          "image_id": str(rec["image_id"]),
          "question_id": rec["question_id"],
          "question": rec["question"],
          "answers": rec["answers"],
          "question_type": rec["question_type"],
          "answer_type": rec["answer_type"],
          "height": height,
          "width": width,
      }

    return self.records(split, [(f"question {r['question_id']}", r) for r in records], make)


def locate(image_dir: str, prefix: str, image_id: int) -> str:
  path = os.path.join(image_dir, f"{prefix}{image_id:012d}.jpg")
  if os.path.isfile(path):
    return path
  plain = os.path.join(image_dir, f"{image_id:012d}.jpg")  # COCO 2017-style names
  return plain if os.path.isfile(plain) else path


def read_vqa(questions_path: str, annotations_path: str | None) -> list[dict]:
  """Questions joined with their annotations by question_id, every field validated."""
  questions = read.top_level(read.load_json(questions_path), "questions", file=questions_path)
  annotations = {}
  if annotations_path:
    for i, ann in enumerate(read.top_level(read.load_json(annotations_path), "annotations", file=annotations_path)):
      qid = read.field(ann, "question_id", int, file=annotations_path, where=f"annotations[{i}]")
      if qid in annotations:
        raise read.RecordError(f"{annotations_path}: record annotations[{i}]: duplicate question_id {qid}")
      annotations[qid] = (i, ann)
  records, seen = [], set()
  for i, q in enumerate(questions):
    qid = read.field(q, "question_id", int, file=questions_path, where=f"questions[{i}]")
    where = f"questions[{i}] (question_id {qid})"
    read.check_unique(seen, qid, file=questions_path, where=where, what="question_id")
    record = {
        "question_id": qid,
        "image_id": read.field(q, "image_id", int, file=questions_path, where=where),
        "question": read.field(q, "question", str, file=questions_path, where=where),
        "answers": [],
        "question_type": "",
        "answer_type": "",
    }
    if annotations_path:
      if qid not in annotations:
        raise read.RecordError(
            f"{questions_path}: record {where}: no annotation with this question_id in " f"{annotations_path}"
        )
      record.update(_annotation(annotations[qid], record["image_id"], file=annotations_path))
    records.append(record)
  return records


def _annotation(indexed: tuple[int, dict], image_id: int, *, file: str) -> dict:
  i, ann = indexed
  where = f"annotations[{i}] (question_id {ann['question_id']})"
  if read.field(ann, "image_id", int, file=file, where=where) != image_id:
    raise read.RecordError(
        f"{file}: record {where}: key 'image_id' is {ann['image_id']}, but the question " f"says {image_id}"
    )
  answers = read.field(ann, "answers", list, file=file, where=where)
  if len(answers) != OFFICIAL_NUM_ANSWERS:
    raise read.RecordError(
        f"{file}: record {where}: key 'answers' must hold {OFFICIAL_NUM_ANSWERS} answers, " f"got {len(answers)}"
    )
  return {
      "answers": [
          read.field(a, "answer", str, file=file, where=f"{where} answers[{j}]") for j, a in enumerate(answers)
      ],
      "question_type": read.field(ann, "question_type", str, file=file, where=where, default=""),
      "answer_type": read.field(ann, "answer_type", str, file=file, where=where, default=""),
  }
