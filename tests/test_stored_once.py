"""Layout 2 (builders/layout.py): each image file is stored once per build, records point at it.

The storage tests measure the bytes a build occupies on disk (every file of its version folder: record
files, image table, dataset_info) against the bytes of the distinct image files its records name, on
fixtures in the real formats with images of a photo's entropy (fixtures_real.photo_bytes). Storing an
image once per record made these ratios 5.06x (VQA, whose test split was built too), 1.98x (COCO)
and 3.03x (NLVR2) on the same fixtures; now they are 1.05, 1.06 and 1.04, most of the rest being the
64 KiB blocks each ArrayRecord file is padded to (docs/experiments/2026-11-30-images-stored-once.md).
"""

from __future__ import annotations

import os

import pytest
import tensorflow_datasets as tfds

from pixelbert_jax.data import prepare as prepare_lib
from pixelbert_jax.data.builders import _common, layout
from pixelbert_jax.data.builders.coco_karpathy import CocoKarpathy
from pixelbert_jax.data.builders.jsonl import Jsonl
from pixelbert_jax.data.builders.nlvr2 import Nlvr2
from pixelbert_jax.data.builders.vqa2 import Vqa2
from tests import fixtures_real as fx

MAX_RATIO = 1.1


def build(cls, manual_dir, data_dir, **kwargs):
  builder = cls(data_dir=str(data_dir), verify_images="header", **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def bytes_on_disk(builder) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(builder.data_dir) for f in files)


def joined(builder, split):
  src = layout.open_split(builder, split, dataset=builder.name)[1]
  return [src[i] for i in range(len(src))]


@pytest.mark.slow
def test_vqa2_stores_each_image_once_and_test_splits_only_when_asked(tmp_path):
  written = fx.write_vqa2_scaled(str(tmp_path / "manual"), train_images=200, val_images=20, test_images=20, questions=5)
  builder = build(Vqa2, tmp_path / "manual", tmp_path / "data")
  # test2015's question file is there, but test splits are built only when asked for
  assert set(builder.info.splits) == {"images", "train", "val"}
  assert layout.left_out_message(builder, "vqa2", "test") is not None
  distinct = {**written["train"], **written["val"]}
  ratio = bytes_on_disk(builder) / sum(len(b) for b in distinct.values())
  assert ratio <= MAX_RATIO, f"stored / distinct image bytes = {ratio:.3f}"
  assert len(builder.as_data_source("images")) == 220
  by_id = {os.path.basename(p)[-16:-4].lstrip("0"): data for p, data in distinct.items()}
  train = joined(builder, "train")
  assert len(train) == 1000
  for record in train:  # every question reads its own image's bytes back
    assert record["image"] == by_id[record["image_id"].decode()]

  with_tests = build(Vqa2, tmp_path / "manual", tmp_path / "data_all", include_test_splits=True)
  assert set(with_tests.info.splits) == {"images", "train", "val", "test"}
  assert len(with_tests.as_data_source("images")) == 240


@pytest.mark.slow
def test_coco_train_is_a_view_and_each_image_is_stored_once(tmp_path):
  parts = {"train": 134, "restval": 50, "val": 8, "test": 8}  # Karpathy's COCO proportions
  written = fx.write_coco_karpathy_scaled(str(tmp_path / "manual"), parts=parts)
  builder = build(CocoKarpathy, tmp_path / "manual", tmp_path / "data")
  ratio = bytes_on_disk(builder) / sum(len(data) for _, data in written.values())
  assert ratio <= MAX_RATIO, f"stored / distinct image bytes = {ratio:.3f}"
  assert "train" not in builder.info.splits and layout.views(builder) == {"train": ["karpathy_train", "restval"]}
  train = joined(builder, "train")
  assert len(train) == parts["train"] + parts["restval"] == layout.num_records(builder, "train")
  expected = [data for part, data in written.values() if part in ("train", "restval")]
  assert [r["image"] for r in train] == expected


@pytest.mark.slow
def test_nlvr2_stores_each_image_once(tmp_path):
  written = fx.write_nlvr2_scaled(str(tmp_path / "manual"), pairs={"train": 80, "dev": 20}, statements=3)
  builder = build(Nlvr2, tmp_path / "manual", tmp_path / "data")
  ratio = bytes_on_disk(builder) / sum(len(b) for b in written.values())
  assert ratio <= MAX_RATIO, f"stored / distinct image bytes = {ratio:.3f}"
  assert len(builder.as_data_source("images")) == 200
  dev = joined(builder, "dev")
  assert len(dev) == 60
  for record in dev:
    stem = record["identifier"].decode().rsplit("-", 1)[0]
    for k in (0, 1):
      [path] = [p for p in written if os.path.basename(p) == f"{stem}-img{k}.png"]
      assert record[f"image{k}"] == written[path]


# --------------------------------------------------------------------------------- an older layout
@pytest.mark.slow
def test_a_build_in_the_old_layout_is_refused_with_a_message_to_rebuild(tmp_path):
  fx.write_nlvr2(str(tmp_path / "manual"))
  build(Nlvr2, tmp_path / "manual", tmp_path / "data")
  # What version 1.0.0 left: a folder beside ours with its dataset_info.json; this code's version absent.
  os.rename(tmp_path / "data" / "nlvr2" / "2.0.0", tmp_path / "data" / "nlvr2" / "1.0.0")
  with pytest.raises(layout.OldLayoutError, match=r"nlvr2/1\.0\.0: a build of nlvr2 in an old layout.*rebuild it"):
    Nlvr2(data_dir=str(tmp_path / "data")).download_and_prepare()
  with pytest.raises(layout.OldLayoutError, match="rebuild"):
    build(Nlvr2, tmp_path / "empty_manual", tmp_path / "data")
  # with the downloaded files at hand, the rebuild happens beside the old folder
  rebuilt = build(Nlvr2, tmp_path / "manual", tmp_path / "data")
  assert rebuilt.data_dir.endswith("2.0.0") and len(joined(rebuilt, "dev")) == 4


def test_a_build_without_an_image_table_is_never_read(tmp_path):
  fx.write_nlvr2(str(tmp_path / "manual"))
  builder = build(Nlvr2, tmp_path / "manual", tmp_path / "data")
  builder.info.metadata["layout"] = 1  # as if metadata.json said an older layout
  with pytest.raises(layout.OldLayoutError, match=r"nlvr2/2\.0\.0: a build in layout 1.*rebuild"):
    layout.open_split(builder, "dev", dataset="nlvr2")


def test_records_name_rows_of_the_table_and_a_bad_row_is_refused(tmp_path):
  fx.write_nlvr2(str(tmp_path / "manual"))
  builder = build(Nlvr2, tmp_path / "manual", tmp_path / "data")
  records, source = layout.open_split(builder, "train", dataset="nlvr2")
  assert records[0]["image_bytes"] == b"" and "image0" not in records[0]  # records hold no image bytes
  refs = ("image0_index", "image1_index")
  broken = layout.JoinedSource([{"image0_index": 12, "image1_index": 0}], source._images, refs, name="x")
  with pytest.raises(IndexError, match=r"x\[0\]: image0_index 12 outside the image table \[0, 12\)"):
    broken[0]
  with pytest.raises(ValueError, match="split 'images' is the image table, not records"):
    layout.open_split(builder, "images", dataset="nlvr2")


def test_prepare_reports_views_and_left_out_test_splits_and_refuses_to_add_them_silently(tmp_path, capsys):
  fx.write_vqa2(str(tmp_path / "manual"))
  args = ["--dataset", "vqa2", "--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]
  assert prepare_lib.main(args) == 0
  out = capsys.readouterr().out
  assert "images: 4 images (each stored once), skipped 0" in out
  assert "test: not built (v2_OpenEnded_mscoco_test2015_questions.json is there; --include_test_splits" in out
  assert prepare_lib.main(args + ["--include_test_splits"]) == 1
  assert "was built without its test splits ['test']: delete that folder" in capsys.readouterr().err
  fx.write_coco_karpathy(str(tmp_path / "coco"), broken=False)
  coco = ["--dataset", "coco_karpathy", "--manual_dir", str(tmp_path / "coco"), "--data_dir", str(tmp_path / "data")]
  assert prepare_lib.main(coco) == 0
  assert "train: 4 examples, read as karpathy_train+restval (not stored)" in capsys.readouterr().out


def test_the_table_is_complete_before_any_record_asks_for_a_row(tmp_path):
  table = _common.ImageTable(
      _common.ImageChecker("header"), str(tmp_path), CocoKarpathy(data_dir=str(tmp_path)).info.features
  )
  table.add(str(tmp_path / "a.jpg"))
  with pytest.raises(RuntimeError, match="before split 'images' was complete"):
    table.row(str(tmp_path / "a.jpg"))


def test_a_build_whose_records_name_no_image_says_so(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "train.jsonl").write_text("\n\n")
  with pytest.raises(_common.TooManyBadRecordsError, match="split images: no record of any split names an image"):
    build(Jsonl, tmp_path / "manual", tmp_path / "data", config="captions")
