"""Real-format builders on tiny fixtures written by tests/fixtures_real.py, read back with tfds.data_source."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from pixelbert_jax.data import prepare as prepare_lib
from pixelbert_jax.data.builders import _common, _read, layout
from pixelbert_jax.data.builders.coco_karpathy import CocoKarpathy
from pixelbert_jax.data.builders.flickr30k import Flickr30kKarpathy
from pixelbert_jax.data.builders.jsonl import Jsonl
from pixelbert_jax.data.builders.nlvr2 import Nlvr2
from pixelbert_jax.data.builders.visual_genome import VisualGenomeRegions
from pixelbert_jax.data.builders.vqa2 import Vqa2
from tests import fixtures_real as fx

# records as the pipeline reads them: stored fields plus the image bytes joined in by row
CAPTION_KEYS = {"image", "image_index", "image_id", "captions", "height", "width"}
VQA_KEYS = {
    "image",
    "image_index",
    "image_id",
    "question_id",
    "question",
    "answers",
    "question_type",
    "answer_type",
    "height",
    "width",
}
NLVR2_KEYS = {"identifier", "sentence", "label", "image0", "image1", "height0", "width0", "height1", "width1"}
NLVR2_KEYS |= {"image0_index", "image1_index"}


def build(cls, manual_dir, data_dir, **kwargs):
  builder = cls(data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def read_all(builder) -> dict[str, list[dict]]:
  """Every record split (and view) of a build, each record joined with its image bytes."""
  out = {}
  for split in layout.record_splits(builder):
    src = layout.open_split(builder, split, dataset=builder.name)[1]
    out[split] = [src[i] for i in range(len(src))]
  return out


def image_table(builder) -> list[bytes]:
  src = builder.as_data_source(layout.IMAGES_SPLIT)
  return [src[i]["image_bytes"] for i in range(len(src))]


def text(value) -> str:
  return value.decode() if isinstance(value, bytes) else value


def check_captions(records, expected_by_id):
  got = {text(r["image_id"]): r for r in records}
  assert set(got) == set(expected_by_id)
  for image_id, r in got.items():
    e = expected_by_id[image_id]
    assert set(r) == CAPTION_KEYS
    assert [text(t) for t in r["captions"]] == e["captions"]
    assert (r["height"], r["width"]) == (e["height"], e["width"])
    assert r["image"] == e["bytes"]  # the original encoded file, untouched


# ------------------------------------------------------------------------------------------ Karpathy
def test_coco_karpathy_splits_counts_fields_and_skipped_image(tmp_path, caplog):
  expected = fx.write_coco_karpathy(str(tmp_path / "manual"))
  with caplog.at_level(logging.WARNING):
    builder = build(CocoKarpathy, tmp_path / "manual", tmp_path / "data", max_bad_fraction=0.5)
  data = read_all(builder)
  by_part = lambda *parts: {k: v for k, v in expected.items() if v["part"] in parts}
  assert set(data) == {"train", "karpathy_train", "restval", "val", "test"}
  check_captions(data["train"], by_part("train", "restval"))
  check_captions(data["karpathy_train"], by_part("train"))
  for part in ("restval", "val", "test"):
    check_captions(data[part], by_part(part))
  # 'train' is a view of karpathy_train + restval: nothing of it is stored twice
  assert set(builder.info.splits) == {"images", "karpathy_train", "restval", "val", "test"}
  assert layout.views(builder) == {"train": ["karpathy_train", "restval"]}
  assert [r["image_id"] for r in data["train"]] == [r["image_id"] for r in data["karpathy_train"] + data["restval"]]
  # each good image once in the table, in the order the records first name it; the truncated one skipped,
  # counted and named, in the table and in the split whose record names it
  assert image_table(builder) == [e["bytes"] for e in expected.values()]
  assert builder.tallies["images"].skipped == builder.tallies["karpathy_train"].skipped == 1
  assert builder.tallies["karpathy_train"].dropped_texts == 1  # image 0's blank caption
  assert "COCO_train2014_000000001005.jpg" in caplog.text


def test_coco_karpathy_too_many_bad_images_fails_with_count_and_names(tmp_path):
  fx.write_coco_karpathy(str(tmp_path / "manual"))
  with pytest.raises(_common.TooManyBadRecordsError, match=r"1 of 3 records skipped.*000000001005\.jpg"):
    build(CocoKarpathy, tmp_path / "manual", tmp_path / "data")  # default max_bad_fraction 0.01


def _edit_json(path, edit):
  with open(path) as f:
    obj = json.load(f)
  edit(obj)
  with open(path, "w") as f:
    json.dump(obj, f)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda o: o["images"][1].pop("split"), r"dataset_coco\.json: record images\[1\].*missing key 'split'"),
        (
            lambda o: o["images"][2]["sentences"][0].update(raw=7),
            r"dataset_coco\.json: record images\[2\].*sentences\[0\]: key 'raw' must be str, got int",
        ),
        (lambda o: o["images"][0].update(split="holdout"), r"images\[0\].*key 'split' must be one of"),
    ],
)
def test_coco_karpathy_malformed_record(tmp_path, edit, pattern):
  fx.write_coco_karpathy(str(tmp_path / "manual"), broken=False)
  _edit_json(tmp_path / "manual" / "dataset_coco.json", edit)
  with pytest.raises(_read.RecordError, match=pattern):
    build(CocoKarpathy, tmp_path / "manual", tmp_path / "data")


def test_flickr30k_splits_without_restval(tmp_path):
  expected = fx.write_flickr30k(str(tmp_path / "manual"))
  data = read_all(build(Flickr30kKarpathy, tmp_path / "manual", tmp_path / "data"))
  assert set(data) == {"train", "val", "test"}
  for split in data:
    check_captions(data[split], {k: v for k, v in expected.items() if v["part"] == split})


def test_flickr30k_kaggle_layout_is_found(tmp_path):
  """Kaggle's copy unpacks to flickr30k_images/flickr30k_images/*.jpg beside results.csv."""
  expected = fx.write_flickr30k(str(tmp_path / "manual"))
  os.makedirs(tmp_path / "manual" / "flickr30k_images")
  os.rename(tmp_path / "manual" / "flickr30k-images", tmp_path / "manual" / "flickr30k_images" / "flickr30k_images")
  (tmp_path / "manual" / "flickr30k_images" / "results.csv").write_text("image_name| comment_number| comment\n")
  data = read_all(build(Flickr30kKarpathy, tmp_path / "manual", tmp_path / "data"))
  for split in ("train", "val", "test"):
    check_captions(data[split], {k: v for k, v in expected.items() if v["part"] == split})


def test_flickr30k_malformed_record(tmp_path):
  fx.write_flickr30k(str(tmp_path / "manual"))
  _edit_json(tmp_path / "manual" / "dataset_flickr30k.json", lambda o: o["images"][3].update(sentences="x"))
  with pytest.raises(_read.RecordError, match=r"images\[3\] \(100003\.jpg\): key 'sentences' must be list"):
    build(Flickr30kKarpathy, tmp_path / "manual", tmp_path / "data")


# ------------------------------------------------------------------------------------- Visual Genome
@pytest.mark.parametrize("with_image_data", [True, False])
def test_visual_genome_regions(tmp_path, with_image_data):
  expected = fx.write_visual_genome(str(tmp_path / "manual"), with_image_data=with_image_data)
  builder = build(VisualGenomeRegions, tmp_path / "manual", tmp_path / "data", max_bad_fraction=0.25)
  data = read_all(builder)
  assert set(data) == {"train"}
  check_captions(data["train"], expected)  # duplicates and blank phrases removed, order kept
  assert builder.tallies["train"].skipped == 1  # image 4 has no file


def test_visual_genome_excludes_coco_karpathy_heldout_images(tmp_path):
  expected = fx.write_visual_genome(str(tmp_path / "manual"))
  coco = fx.write_coco_karpathy(str(tmp_path / "coco"), broken=False)
  heldout = {int(k) for k, v in coco.items() if v["part"] in ("val", "test")}
  builder = build(
      VisualGenomeRegions,
      tmp_path / "manual",
      tmp_path / "data",
      max_bad_fraction=0.5,
      exclude_coco_heldout=str(tmp_path / "coco" / "dataset_coco.json"),
  )
  kept = {k: v for k, v in expected.items() if fx.VG_COCO_IDS.get(int(k)) not in heldout}
  assert 0 < len(kept) < len(expected)
  check_captions(read_all(builder)["train"], kept)
  assert builder.excluded == len(expected) - len(kept)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_json_array_stream_reads_what_json_load_reads(tmp_path, chunk):
  """Chunk boundaries fall inside strings, numbers, escapes and multi-byte characters at chunk 1 and 7."""
  fx.write_visual_genome(str(tmp_path / "manual"))
  path = str(tmp_path / "manual" / "region_descriptions.json")
  with open(path) as f:
    whole = json.load(f)
  assert [v for _, v in _read.iter_json_array(path, chunk=chunk)] == whole
  odd = [12345, -0.5e3, 'caf\u00e9 \\ "x"', "日本", {"a": [1, {"b": None}]}, [], True, None]
  (tmp_path / "odd.json").write_text(" \n" + json.dumps(odd, ensure_ascii=False, indent=1) + "\n ")
  assert [v for _, v in _read.iter_json_array(str(tmp_path / "odd.json"), chunk=chunk)] == odd
  (tmp_path / "empty.json").write_text("[ ]")
  assert list(_read.iter_json_array(str(tmp_path / "empty.json"), chunk=chunk)) == []


@pytest.mark.parametrize(
    "content, pattern",
    [
        ('{"id": 1}', r"bad\.json: expected a top-level list, got an object"),
        ("", r"bad\.json: expected a top-level list, got an empty file"),
        ('[{"id": 1}, {"id": 2', r"bad\.json: not valid JSON in element \[1\] at character \d+"),
        (
            '[{"id": 1} {"id": 2}]',
            r"bad\.json: not valid JSON at character 11: expected ',' or '\]' after element \[0\]",
        ),
        ('[{"id": 1}, ]', r"bad\.json: not valid JSON in element \[1\]"),
        ("[1, 2] x", r"bad\.json: not valid JSON at character 7: extra data after the top-level list"),
        ("[1, 2", r"after element \[1\], got 'the end of the file'"),
    ],
)
def test_json_array_stream_rejects_what_it_does_not_understand(tmp_path, content, pattern):
  (tmp_path / "bad.json").write_text(content)
  for chunk in (3, 1 << 20):
    with pytest.raises(_read.RecordError, match=pattern):
      list(_read.iter_json_array(str(tmp_path / "bad.json"), chunk=chunk))


def test_visual_genome_malformed_record(tmp_path):
  fx.write_visual_genome(str(tmp_path / "manual"))
  _edit_json(tmp_path / "manual" / "region_descriptions.json", lambda o: o[2]["regions"][1].pop("phrase"))
  with pytest.raises(
      _read.RecordError,
      match=r"region_descriptions\.json: record \[2\] \(image 3\) regions\[1\]: missing key 'phrase'",
  ):
    build(VisualGenomeRegions, tmp_path / "manual", tmp_path / "data")


# --------------------------------------------------------------------------------------------- VQA v2
def test_vqa2_splits_answers_and_unannotated_test(tmp_path):
  expected = fx.write_vqa2(str(tmp_path / "manual"))
  data = read_all(build(Vqa2, tmp_path / "manual", tmp_path / "data", include_test_splits=True))
  assert set(data) == {"train", "val", "test"}
  for split, records in data.items():
    got = {r["question_id"]: r for r in records}
    assert set(got) == set(expected[split])
    for qid, r in got.items():
      e = expected[split][qid]
      assert set(r) == VQA_KEYS
      assert [text(a) for a in r["answers"]] == e["answers"]
      assert len(r["answers"]) == (10 if split != "test" else 0)
      for key in ("image_id", "question", "question_type", "answer_type"):
        assert text(r[key]) == e[key], key
      assert (r["height"], r["width"], r["image"]) == (e["height"], e["width"], e["bytes"])


@pytest.mark.parametrize(
    "file, edit, pattern",
    [
        (
            "v2_mscoco_val2014_annotations.json",
            lambda o: o["annotations"][1].pop("answers"),
            r"annotations\.json: record annotations\[1\] \(question_id 21000\): missing key 'answers'",
        ),
        (
            "v2_OpenEnded_mscoco_train2014_questions.json",
            lambda o: o["questions"][0].update(question_id="10000"),
            r"questions\.json: record questions\[0\]: key 'question_id' must be int, got str",
        ),
        (
            "v2_mscoco_train2014_annotations.json",
            lambda o: o["annotations"][0]["answers"].pop(),
            r"key 'answers' must hold 10 answers, got 9",
        ),
    ],
)
def test_vqa2_malformed_record(tmp_path, file, edit, pattern):
  fx.write_vqa2(str(tmp_path / "manual"))
  _edit_json(tmp_path / "manual" / file, edit)
  with pytest.raises(_read.RecordError, match=pattern):
    build(Vqa2, tmp_path / "manual", tmp_path / "data")


# ---------------------------------------------------------------------------------------------- NLVR2
def test_nlvr2_pairs_labels_and_sniffed_formats(tmp_path):
  expected = fx.write_nlvr2(str(tmp_path / "manual"))
  data = read_all(build(Nlvr2, tmp_path / "manual", tmp_path / "data"))
  assert set(data) == {"train", "dev", "test1"}
  jpeg_under_png_name = 0
  for split, records in data.items():
    got = {text(r["identifier"]): r for r in records}
    assert set(got) == set(expected[split])
    for ident, r in got.items():
      e = expected[split][ident]
      assert set(r) == NLVR2_KEYS
      assert (text(r["sentence"]), r["label"]) == (e["sentence"], e["label"])
      for k, (h, w, data_k) in enumerate(e["sizes"]):
        assert (r[f"height{k}"], r[f"width{k}"], r[f"image{k}"]) == (h, w, data_k)
        jpeg_under_png_name += r[f"image{k}"].startswith(b"\xff\xd8")
  assert jpeg_under_png_name > 0
  assert {r["label"] for r in data["train"]} == {0, 1}


def test_nlvr2_test2_is_read_when_present(tmp_path):
  expected = fx.write_nlvr2(str(tmp_path / "manual"))
  for name in ("test1.json", os.path.join("images", "test1")):  # test2 as released: the same format
    src = tmp_path / "manual" / name
    text_ = src.read_text().replace("test1-", "test2-") if src.is_file() else None
    os.rename(src, tmp_path / "manual" / name.replace("test1", "test2"))
    if text_ is not None:
      (tmp_path / "manual" / name.replace("test1", "test2")).write_text(text_)
  for path in (tmp_path / "manual" / "images" / "test2").iterdir():
    os.rename(path, path.with_name(path.name.replace("test1-", "test2-")))
  data = read_all(build(Nlvr2, tmp_path / "manual", tmp_path / "data"))
  assert set(data) == {"train", "dev", "test2"}
  assert {text(r["identifier"]) for r in data["test2"]} == {i.replace("test1-", "test2-") for i in expected["test1"]}


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: r.pop("sentence"), r"dev\.json: record line 2 \(dev-7-0-1\): missing key 'sentence'"),
        (lambda r: r.update(label="Maybe"), r"dev\.json: record line 2 \(dev-7-0-1\): key 'label' must be 'True' or"),
        (lambda r: r.update(label=1), r"key 'label' must be str or bool, got int"),
    ],
)
def test_nlvr2_malformed_record(tmp_path, edit, pattern):
  fx.write_nlvr2(str(tmp_path / "manual"))
  path = tmp_path / "manual" / "dev.json"
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  edit(lines[1])
  fx.write_jsonl(str(path), lines)
  with pytest.raises(_read.RecordError, match=pattern):
    build(Nlvr2, tmp_path / "manual", tmp_path / "data")


# ---------------------------------------------------------------------------------------------- JSONL
def test_jsonl_captions_one_split_per_file(tmp_path):
  expected = fx.write_jsonl_captions(str(tmp_path / "manual"))
  builder = build(Jsonl, tmp_path / "manual", tmp_path / "data", config="captions", max_bad_fraction=0.25)
  data = read_all(builder)
  assert set(data) == {"train", "val"}
  for split in data:
    check_captions(data[split], {e["image_id"]: e for e in expected[split].values()})
  assert builder.tallies["train"].skipped == 1  # pics/3.png does not exist


def test_jsonl_vqa_with_and_without_optional_keys(tmp_path):
  expected = fx.write_jsonl_vqa(str(tmp_path / "manual"))
  data = read_all(build(Jsonl, tmp_path / "manual", tmp_path / "data", config="vqa"))
  assert set(data) == {"train", "test"}
  for split, records in data.items():
    got = {r["question_id"]: r for r in records}
    assert set(got) == set(expected[split])
    for qid, r in got.items():
      e = expected[split][qid]
      assert set(r) == VQA_KEYS
      assert [text(a) for a in r["answers"]] == e["answers"]
      for key in ("image_id", "question", "question_type", "answer_type"):
        assert text(r[key]) == e[key], key
      assert (r["height"], r["width"], r["image"]) == (e["height"], e["width"], e["bytes"])


def test_jsonl_file_named_like_the_image_table_is_refused(tmp_path):
  fx.write_jsonl_captions(str(tmp_path / "manual"))
  os.rename(tmp_path / "manual" / "val.jsonl", tmp_path / "manual" / "images.jsonl")
  with pytest.raises(ValueError, match=r"images\.jsonl: .*'images' is the name of the build's image table"):
    build(Jsonl, tmp_path / "manual", tmp_path / "data", config="captions", max_bad_fraction=0.25)


def test_vqa2_only_test_files_says_how_to_build_them(tmp_path):
  fx.write_vqa2(str(tmp_path / "manual"))
  for split in ("train2014", "val2014"):
    os.remove(tmp_path / "manual" / f"v2_OpenEnded_mscoco_{split}_questions.json")
  with pytest.raises(FileNotFoundError, match=r"test question files are there: pass --include_test_splits"):
    build(Vqa2, tmp_path / "manual", tmp_path / "data")
  assert set(read_all(build(Vqa2, tmp_path / "manual", tmp_path / "d2", include_test_splits=True))) == {"test"}


@pytest.mark.parametrize(
    "config, writer, line, pattern",
    [
        (
            "captions",
            fx.write_jsonl_captions,
            {"caption": "no image"},
            r"train\.jsonl: record line 5: missing key 'image'",
        ),
        (
            "captions",
            fx.write_jsonl_captions,
            {"image": "pics/0.jpg", "caption": "a", "captions": ["b"]},
            r"line 5: needs exactly one of the keys 'caption' and 'captions'",
        ),
        (
            "captions",
            fx.write_jsonl_captions,
            {"image": "pics/0.jpg", "captions": ["a", 3]},
            r"line 5: key 'captions'\[1\] must be str, got int",
        ),
        (
            "vqa",
            fx.write_jsonl_vqa,
            {"image": "imgs/train1.jpg", "question": "q?", "answers": "yes"},
            r"train\.jsonl: record line 4: key 'answers' must be list, got str",
        ),
        (
            "vqa",
            fx.write_jsonl_vqa,
            {"image": "imgs/train1.jpg", "question": "q?", "answers": [], "question_id": 555},
            r"line 4: duplicate question_id 555",
        ),
    ],
)
def test_jsonl_malformed_record(tmp_path, config, writer, line, pattern):
  writer(str(tmp_path / "manual"))
  with open(tmp_path / "manual" / "train.jsonl", "a") as f:
    f.write(json.dumps(line) + "\n")
  with pytest.raises(_read.RecordError, match=pattern):
    build(Jsonl, tmp_path / "manual", tmp_path / "data", config=config)


# ------------------------------------------------------------------------------- images, CLI, no TF
def test_header_and_decode_checks_agree_on_exif_rotated_size(tmp_path):
  from PIL import Image

  img, exif = Image.new("RGB", (40, 10), (200, 10, 10)), Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees: displayed as 10 wide, 40 high
  img.save(tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes())
  for verify in _common.VERIFY_MODES:
    _, h, w = _common.ImageChecker(verify).read(str(tmp_path / "rot.jpg"))
    assert (h, w) == (40, 10), verify
  (tmp_path / "empty.jpg").write_bytes(b"")
  (tmp_path / "text.jpg").write_bytes(b"not an image at all")
  for verify in _common.VERIFY_MODES:
    for bad in ("empty.jpg", "text.jpg", "absent.jpg"):
      with pytest.raises(_common.BadImageError, match=bad):
        _common.ImageChecker(verify).read(str(tmp_path / bad))


def test_truncated_jpeg_is_caught_by_decode_not_by_header(tmp_path):
  path = str(tmp_path / "cut.jpg")
  fx.write_truncated_jpeg(path)
  with pytest.raises(_common.BadImageError, match="cut.jpg"):
    _common.ImageChecker("decode").read(path)
  assert _common.ImageChecker("header").read(path)[1:] == (96, 128)  # the documented price of 'header'


@pytest.mark.slow
def test_prepare_cli_builds_and_reports(tmp_path, capsys):
  fx.write_jsonl_vqa(str(tmp_path / "manual"))
  rc = prepare_lib.main(
      [
          "--dataset",
          "jsonl",
          "--builder_config",
          "vqa",
          "--manual_dir",
          str(tmp_path / "manual"),
          "--data_dir",
          str(tmp_path / "data"),
          "--verify_images",
          "header",
      ]
  )
  out = capsys.readouterr().out
  assert rc == 0
  assert "train: 3 examples, skipped 0" in out and "test: 1 examples" in out
  assert "tfds.data_source('jsonl/vqa'" in out
  with pytest.raises(ValueError, match="needs builder_config, one of"):
    prepare_lib.prepare("jsonl", manual_dir=str(tmp_path / "manual"), data_dir=str(tmp_path / "d2"))
  with pytest.raises(SystemExit):
    prepare_lib.main(["--dataset", "imagenet", "--manual_dir", "x", "--data_dir", "y"])
  (tmp_path / "manual" / "test.jsonl").write_text('{"image": "imgs/test0.jpg", "question": 5, "answers": []}\n')
  rc = prepare_lib.main(
      [
          "--dataset",
          "jsonl",
          "--builder_config",
          "vqa",
          "--manual_dir",
          str(tmp_path / "manual"),
          "--data_dir",
          str(tmp_path / "data3"),
      ]
  )
  assert rc == 1
  assert "test.jsonl: record line 1: key 'question' must be str, got int" in capsys.readouterr().err


def test_prepare_cli_relative_manual_dir_and_tilde_data_dir(tmp_path, monkeypatch, capsys):
  """`--data_dir=~/tfds` arrives with its `~` (bash expands none after `=`): without resolving, TFDS would
  build into a folder named '~' under the cwd."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  fx.write_jsonl_vqa(str(tmp_path / "manual"))
  rc = prepare_lib.main(
      [
          "--dataset",
          "jsonl",
          "--builder_config",
          "vqa",
          "--manual_dir=manual",
          "--data_dir=~/tfds",
          "--verify_images",
          "header",
      ]
  )
  assert rc == 0, capsys.readouterr().err
  assert f"data_dir={str(tmp_path / 'home' / 'tfds')!r}" in capsys.readouterr().out
  assert len(tfds.data_source("jsonl/vqa", data_dir=str(tmp_path / "home" / "tfds"))["train"]) == 3
  assert not (tmp_path / "~").exists()


@pytest.mark.slow
def test_data_source_reads_without_tensorflow_or_our_code(tmp_path):
  fx.write_nlvr2(str(tmp_path / "manual"))
  builder = build(Nlvr2, tmp_path / "manual", tmp_path / "data")
  # A fresh interpreter that never imports pixelbert_jax: the files alone describe the dataset.
  # A record names its images by row of split 'images', which holds each file once.
  script = (
      "import sys, tensorflow_datasets as tfds\n"
      f"src = tfds.data_source('nlvr2', data_dir={str(tmp_path / 'data')!r})\n"
      "r = src['dev'][0]\n"
      "image = src['images'][int(r['image0_index'])]\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
      "assert not any(m.startswith('pixelbert_jax') for m in sys.modules)\n"
      "print(len(src['dev']), r['image0_index'] >= 0, r['image_bytes'], type(image['image_bytes']).__name__)\n"
      "print(image['image_file'].decode())\n"
  )
  out = subprocess.run(
      [sys.executable, "-c", script],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=str(tmp_path),
      env={**os.environ, "PYTHONPATH": ""},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  first = read_all(builder)["dev"][0]
  assert out.stdout.split("\n")[:2] == ["4 True b'' bytes", f"images/dev/{text(first['identifier'])[:-2]}-img0.png"]


@pytest.mark.parametrize(
    "name, builder_config, writer, task, split, count",
    [
        ("coco_karpathy", "", lambda d: fx.write_coco_karpathy(d, broken=False), "pretrain", "train", 4),
        ("flickr30k", "", fx.write_flickr30k, "retrieval", "test", 1),
        ("vqa2", "", fx.write_vqa2, "vqa", "val", 3),
        ("nlvr2", "", fx.write_nlvr2, "nlvr2", "dev", 4),
        ("jsonl", "vqa", fx.write_jsonl_vqa, "vqa", "train", 3),
    ],
)
def test_pipeline_data_source_finds_each_builder(tmp_path, name, builder_config, writer, task, split, count):
  from pixelbert_jax.data import builders
  from pixelbert_jax.data.config import data_config

  writer(str(tmp_path / "manual"))
  cfg = data_config(name)
  cfg.data_dir, cfg.manual_dir, cfg.builder_config = str(tmp_path / "data"), str(tmp_path / "manual"), builder_config
  assert len(builders.data_source(cfg, task, split)) == count


def test_user_text_files_that_are_not_utf8_name_the_file_and_the_line(tmp_path):
  """JSON lines, whole-file JSON, a JSON list read in chunks (with a character cut between two chunks) and a
  vocab: a byte that is not UTF-8 is an error naming the file and the line, not the codec's position."""
  from pixelbert_jax.data import text

  lines = tmp_path / "a.jsonl"
  lines.write_bytes(b'{"x": 1}\n\n{"x": "\xc3\xa9"}\n{"x": "\xff"}\n')
  with pytest.raises(_read.RecordError, match=rf"^{re.escape(str(lines))}: line 4: not valid UTF-8 \(byte 0xff"):
    list(_read.iter_json_lines(str(lines)))
  whole = tmp_path / "a.json"
  whole.write_bytes(b'{"images": [\n  "\xc3\xa9",\n  "\xfe"\n]}\n')
  with pytest.raises(_read.RecordError, match=rf"^{re.escape(str(whole))}: line 3: not valid UTF-8 \(byte 0xfe"):
    _read.load_json(str(whole))
  array = tmp_path / "list.json"
  good = '[\n"\u00e9\u00e9\u00e9",\n"\u20ac"\n]'.encode()
  array.write_bytes(good)
  assert [v for _, v in _read.iter_json_array(str(array), chunk=3)] == ["\u00e9\u00e9\u00e9", "\u20ac"]
  array.write_bytes(good[:-2] + b',\n"\xe2\x82"\n]')  # a euro sign without its last byte, on line 4
  with pytest.raises(_read.RecordError, match=rf"^{re.escape(str(array))}: line 4: not valid UTF-8 \(byte 0xe2"):
    list(_read.iter_json_array(str(array), chunk=3))
  vocab = tmp_path / "vocab.txt"
  vocab.write_bytes(b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nred\nbl\xffue\n")
  with pytest.raises(ValueError, match=rf"^vocab file {re.escape(str(vocab))}: line 7: not valid UTF-8"):
    text.load_tokenizer(str(vocab))


def test_an_unfinished_build_left_behind_is_named_with_its_size(tmp_path, caplog):
  """A build killed half-way leaves TFDS's incomplete.* folder, and the next build writes another beside it:
  the next build names each one with its size (it is not deleted: another process may be writing it)."""
  from pixelbert_jax.data import synthetic as world
  from pixelbert_jax.data.builders import synthetic

  config = synthetic.synthetic_config(
      "captions", seed=0, image_size=48, num_train=2, num_val=2, num_test=2, scene=world.SceneSpec(1, 1)
  )
  builder = synthetic.SyntheticWorld(config=config, data_dir=str(tmp_path), file_format="array_record")
  left = os.path.join(os.path.dirname(os.fspath(builder.data_dir)), f"incomplete.AB12CD_{builder.version}")
  os.makedirs(left)
  with open(os.path.join(left, "part"), "wb") as f:
    f.write(b"\0" * 3 * 2**20)
  with caplog.at_level(logging.WARNING):
    synthetic.prepare(config, str(tmp_path))
  named = [r.getMessage() for r in caplog.records if left in r.getMessage()]
  assert named == [
      f"{left}: an unfinished build of synthetic_world (3.0 MB), left by a build that was stopped; delete it "
      "unless another process is building this dataset now"
  ]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    synthetic.prepare(config, str(tmp_path))  # built: reused, nothing to say
  assert not [r for r in caplog.records if "unfinished" in r.getMessage()]
