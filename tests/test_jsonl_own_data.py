"""A user's own JSON-lines files: each mistake is one `error:` line naming the file, the line and the key;
integer image ids, unannotated test splits, and caption lines of one image merged into one record."""

from __future__ import annotations

import json
import os
import re

import pytest
import tensorflow_datasets as tfds

from pixelbert_jax.data import prepare as prepare_lib
from tests import own_data_helpers as od


def _prepare(manual, data, config="vqa", *extra):
  return prepare_lib.main(
      [
          "--dataset",
          "jsonl",
          "--builder_config",
          config,
          "--manual_dir",
          str(manual),
          "--data_dir",
          str(data),
          "--verify_images",
          "header",
          *extra,
      ]
  )


def _append(path, record):
  with open(path, "a") as f:
    f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


def _one_error_line(capsys) -> str:
  """The one `error:` line (TFDS's progress bars may come before it), with no traceback after it."""
  err = capsys.readouterr().err.strip().splitlines()
  errors = [line for line in err if line.startswith("error: ")]
  assert len(errors) == 1 and err[-1] == errors[0], err
  return errors[0]


@pytest.mark.parametrize(
    "record, pattern",
    [
        (
            {"image": "images/0.jpg", "question": "what?", "answers": []},
            r"train\.jsonl: record line 9: key 'answers' is missing or empty, while other questions of this file have "
            r"answers \(e\.g\. line 1\)",
        ),
        (
            {"image": "images/0.jpg", "question": "what?"},
            r"train\.jsonl: record line 9: key 'answers' is missing or empty",
        ),
        (
            {"image": "images/0.jpg", "question": "what?", "answers": ["red", "  "]},
            r"train\.jsonl: record line 9: key 'answers'\[1\] is blank",
        ),
        ({"question": "what?", "answers": ["red"]}, r"train\.jsonl: record line 9: missing key 'image'"),
        ({"image": " ", "question": "what?", "answers": ["red"]}, r"train\.jsonl: record line 9: key 'image' is empty"),
        (
            {"image": "../elsewhere/0.jpg", "question": "what?", "answers": ["red"]},
            r"train\.jsonl: record line 9: key 'image' '\.\./elsewhere/0\.jpg' is outside the folder .*mine",
        ),
        (
            {"image": "images/../../0.jpg", "question": "what?", "answers": ["red"]},
            r"train\.jsonl: record line 9: key 'image' .* is outside the folder",
        ),
        (
            {"image": "images/0.jpg", "question": "what?", "answers": ["red"], "image_id": [1]},
            r"train\.jsonl: record line 9: key 'image_id' must be str or int, got list",
        ),
        (
            {"image": "images/0.jpg", "question": "what?", "answers": ["red"], "image_id": True},
            r"train\.jsonl: record line 9: key 'image_id' must be str or int, got bool",
        ),
        (
            '{"image": "images/0.jpg", "question": "what?", "answers": ["red"],}',
            r"train\.jsonl: line 9: not valid JSON",
        ),
    ],
)
def test_a_mistake_is_one_line_naming_file_line_and_key(tmp_path, capsys, record, pattern):
  manual = od.write_vqa_folder(str(tmp_path / "mine"), train_counts=[1, 3] * 4, val_counts=[1, 3])
  _append(os.path.join(manual, "train.jsonl"), record)
  assert _prepare(manual, tmp_path / "tfds") == 1
  line = _one_error_line(capsys)
  assert os.path.join(manual, "train.jsonl") in line
  assert re.search(pattern, line), line


def test_an_absolute_image_path_outside_the_folder_is_refused(tmp_path, capsys):
  manual = od.write_vqa_folder(str(tmp_path / "mine"), train_counts=[1, 3], val_counts=[1])
  od.write_images(str(tmp_path / "elsewhere"), 1)
  _append(
      os.path.join(manual, "train.jsonl"),
      {"image": str(tmp_path / "elsewhere" / "0.jpg"), "question": "what?", "answers": ["red"]},
  )
  assert _prepare(manual, tmp_path / "tfds") == 1
  assert "train.jsonl: record line 3: key 'image'" in _one_error_line(capsys)


def test_a_question_whose_image_file_is_missing(tmp_path, capsys):
  """A missing file is skipped and counted like any unreadable image (large crawled sets lose a few); past
  max_bad_fraction the build stops, and the line names the file, the line and the key."""
  manual = od.write_vqa_folder(str(tmp_path / "mine"), train_counts=[1, 3] * 4, val_counts=[1])
  _append(os.path.join(manual, "train.jsonl"), {"image": "images/absent.jpg", "question": "what?", "answers": ["red"]})
  assert _prepare(manual, tmp_path / "tfds") == 1
  line = _one_error_line(capsys)
  assert "1 of 9 records skipped" in line
  assert f"{os.path.join(manual, 'train.jsonl')}: record line 9: key 'image': " in line and "absent.jpg" in line
  assert _prepare(manual, tmp_path / "tfds2", "vqa", "--max_bad_fraction", "0.2") == 0  # tolerated when asked


def test_integer_image_id_unannotated_test_split_and_linked_image_folder(tmp_path, capsys):
  manual = od.write_vqa_folder(str(tmp_path / "mine"), train_counts=[1, 3], val_counts=[1])
  od.write_images(str(tmp_path / "photos"), 2)
  os.symlink(tmp_path / "photos", os.path.join(manual, "linked"))  # images kept elsewhere, linked in
  _append(
      os.path.join(manual, "train.jsonl"),
      {"image": "linked/1.jpg", "question": "what?", "answers": ["red"], "image_id": 7},
  )
  # A test split: no answers on any line, as an empty list or left out.
  with open(os.path.join(manual, "test.jsonl"), "w") as f:
    f.write(json.dumps({"image": "images/0.jpg", "question": "what colour?", "answers": []}) + "\n")
    f.write(json.dumps({"image": "images/1.jpg", "question": "what colour?", "image_id": 12}) + "\n")
  assert _prepare(manual, tmp_path / "tfds") == 0, capsys.readouterr().err
  data = tfds.data_source("jsonl/vqa", data_dir=str(tmp_path / "tfds"))
  train = {r["question_id"]: r for r in (data["train"][i] for i in range(len(data["train"])))}
  assert [train[q]["image_id"] for q in (1, 2, 3)] == [b"0", b"1", b"7"]
  assert [a.decode() for a in train[2]["answers"]] == ["green", "green", "blue"]
  test = [data["test"][i] for i in range(len(data["test"]))]
  assert [list(r["answers"]) for r in test] == [[], []]
  assert sorted(r["image_id"] for r in test) == [b"12", b"images/0.jpg"]  # default: the path as written


def test_caption_lines_of_one_image_become_one_record(tmp_path, capsys):
  manual = od.write_captions_folder(str(tmp_path / "caps"), num_train=4, num_val=3)
  assert _prepare(manual, tmp_path / "tfds", "captions") == 0, capsys.readouterr().err
  assert "train: 4 examples" in capsys.readouterr().out  # 8 lines, 4 images
  data = tfds.data_source("jsonl/captions", data_dir=str(tmp_path / "tfds"))
  train = sorted((data["train"][i] for i in range(len(data["train"]))), key=lambda r: r["image_id"])  # TFDS shuffles
  assert [r["image_id"] for r in train] == [f"images/{i}.jpg".encode() for i in range(4)]
  assert [[c.decode() for c in r["captions"]] for r in train][:2] == [
      ["a red picture", "a plain red square"],
      ["a green picture", "a plain green square"],
  ]
  _append(os.path.join(manual, "train.jsonl"), {"image": "images/1.jpg", "caption": "x", "image_id": "images/0.jpg"})
  assert _prepare(manual, tmp_path / "tfds2", "captions") == 1
  assert "train.jsonl: record line 9: key 'image_id' 'images/0.jpg' names image" in _one_error_line(capsys)


def test_training_reports_a_missing_image_file_on_one_line(tmp_path):
  """Training builds a missing dataset itself; main.py prints a ValueError as one `error:` line (not a
  traceback), so the too-many-skipped error of a user's file must be one."""
  from pixelbert_jax.data import builders
  from pixelbert_jax.data.config import data_config

  manual = od.write_vqa_folder(str(tmp_path / "mine"), train_counts=[1, 3], val_counts=[1])
  _append(os.path.join(manual, "train.jsonl"), {"image": "images/absent.jpg", "question": "what?", "answers": ["red"]})
  cfg = data_config("jsonl")
  cfg.data_dir, cfg.manual_dir = str(tmp_path / "tfds"), manual
  with pytest.raises(ValueError, match=r"train\.jsonl: record line 3: key 'image': .*absent\.jpg"):
    builders.data_source(cfg, "vqa", "train")


def test_invalid_utf8_is_one_line_naming_file_and_line(tmp_path, capsys):
  """A byte that is not UTF-8 in a user's jsonl said "'utf-8' codec can't decode byte 0xff in position 238",
  naming neither the file nor the line."""
  manual = od.write_vqa_folder(str(tmp_path / "mine"), train_counts=[1, 3] * 4, val_counts=[1, 3])
  with open(os.path.join(manual, "train.jsonl"), "ab") as f:
    f.write(b'{"image": "images/0.jpg", "question": "what \xff?", "answers": ["red"]}\n')
  assert _prepare(manual, tmp_path / "tfds") == 1
  line = _one_error_line(capsys)
  assert f"{os.path.join(manual, 'train.jsonl')}: line 9: not valid UTF-8 (byte 0xff at byte" in line, line
