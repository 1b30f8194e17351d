"""Writes tiny copies of the real datasets, in their real file formats, with real JPEG/PNG images.

Each writer returns what a correct builder must produce (per-split ids, captions, image sizes), derived
from the same description that wrote the files, so the tests compare against the files, not constants.
"""

from __future__ import annotations

import functools
import io
import json
import os

import numpy as np
from PIL import Image


def image_bytes(height: int, width: int, *, fmt: str = "JPEG", seed: int = 0) -> bytes:
  img = Image.new("RGB", (width, height), ((37 * seed) % 256, (91 * seed) % 256, 128))
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def write_image(path: str, height: int, width: int, *, fmt: str = "JPEG", seed: int = 0) -> bytes:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = image_bytes(height, width, fmt=fmt, seed=seed)
  with open(path, "wb") as f:
    f.write(data)
  return data


def write_truncated_jpeg(path: str) -> None:
  """A JPEG whose header is intact but whose pixel data stops at 60%: only a full decode notices."""
  noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noise).save(buf, "JPEG", quality=95)
  data = buf.getvalue()
  with open(path, "wb") as f:
    f.write(data[: int(len(data) * 0.6)])


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def write_jsonl(path: str, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _size(i: int) -> tuple[int, int]:
  return 20 + 3 * i, 30 + 5 * (i % 3)  # distinct (height, width) per image, both orientations absent


# ------------------------------------------------------------------------------------------ Karpathy
KARPATHY_PARTS = ["train", "train", "restval", "val", "test", "train"]


def write_coco_karpathy(root: str, *, broken: bool = True) -> dict:
  """dataset_coco.json + train2014/ val2014/. Image 5 (train) is truncated when `broken`."""
  images, expected = [], {}
  for i, part in enumerate(KARPATHY_PARTS):
    cocoid = 1000 + i
    folder = "val2014" if part in ("val", "test", "restval") else "train2014"
    filename = f"COCO_{folder}_{cocoid:012d}.jpg"
    h, w = _size(i)
    data = write_image(os.path.join(root, folder, filename), h, w, seed=i)
    raws = [f"A picture number {i} caption {k}. " for k in range(5)]
    if i == 0:
      raws[2] = "   "  # an empty caption is dropped, the image kept
    if broken and i == 5:
      write_truncated_jpeg(os.path.join(root, folder, filename))
    sentences = [{"tokens": r.lower().split(), "raw": r, "imgid": i, "sentid": 5 * i + k} for k, r in enumerate(raws)]
    images.append(
        {
            "filepath": folder,
            "sentids": [5 * i + k for k in range(5)],
            "filename": filename,
            "imgid": i,
            "split": part,
            "sentences": sentences,
            "cocoid": cocoid,
        }
    )
    if not (broken and i == 5):
      expected[str(cocoid)] = {
          "part": part,
          "height": h,
          "width": w,
          "captions": [r.strip() for r in raws if r.strip()],
          "bytes": data,
      }
  write_json(os.path.join(root, "dataset_coco.json"), {"images": images, "dataset": "coco"})
  return expected


def write_flickr30k(root: str) -> dict:
  """dataset_flickr30k.json (no filepath, no cocoid) + flickr30k-images/, parts train/val/test only."""
  images, expected = [], {}
  for i, part in enumerate(["train", "train", "val", "test"]):
    filename = f"{100000 + i}.jpg"
    h, w = _size(i)
    data = write_image(os.path.join(root, "flickr30k-images", filename), h, w, seed=i)
    raws = [f"Flickr photo {i} sentence {k}" for k in range(5)]
    images.append(
        {
            "sentids": list(range(5 * i, 5 * i + 5)),
            "imgid": i,
            "split": part,
            "filename": filename,
            "sentences": [{"tokens": r.split(), "raw": r, "imgid": i, "sentid": 5 * i + k} for k, r in enumerate(raws)],
        }
    )
    expected[str(100000 + i)] = {"part": part, "height": h, "width": w, "captions": raws, "bytes": data}
  write_json(os.path.join(root, "dataset_flickr30k.json"), {"images": images, "dataset": "flickr30k"})
  return expected


# ------------------------------------------------------------------------------------- Visual Genome
# VG image id -> COCO id: 2 is the COCO fixture's val image, 107899 its test image, 3 a train image.
VG_COCO_IDS = {2: 1003, 107899: 1004, 3: 1000}


def write_visual_genome(root: str, *, with_image_data: bool = True) -> dict:
  """region_descriptions.json (+ image_data.json) + VG_100K/ and VG_100K_2/. Image 4 is missing."""
  records, image_data, expected = [], [], {}
  for i, image_id in enumerate([1, 2, 3, 107899, 4]):
    folder = "VG_100K_2" if i % 2 else "VG_100K"
    h, w = _size(i)
    phrases = [f"region {k} of image {image_id}" for k in range(3)] + [f"region 0 of image {image_id}", " "]
    if image_id != 4:
      data = write_image(os.path.join(root, folder, f"{image_id}.jpg"), h, w, seed=i)
      expected[str(image_id)] = {"height": h, "width": w, "captions": phrases[:3], "bytes": data}
    records.append(
        {
            "id": image_id,
            "regions": [
                {
                    "region_id": 100 * image_id + k,
                    "width": 5,
                    "height": 6,
                    "image_id": image_id,
                    "phrase": p,
                    "y": 1,
                    "x": 2,
                }
                for k, p in enumerate(phrases)
            ],
        }
    )
    image_data.append(
        {
            "width": w,
            "height": h,
            "image_id": image_id,
            "coco_id": VG_COCO_IDS.get(image_id),
            "flickr_id": None,
            "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg",
        }
    )
  write_json(os.path.join(root, "region_descriptions.json"), records)
  if with_image_data:
    write_json(os.path.join(root, "image_data.json"), image_data)
  return expected


# --------------------------------------------------------------------------------------------- VQA v2
VQA_FILES = {"train": ("train2014", True), "val": ("val2014", True), "test": ("test2015", False)}


def write_vqa2(root: str) -> dict:
  """Questions/annotations files of train, val and test (no annotations), COCO-named images."""
  expected = {}
  for s, (split, (folder, annotated)) in enumerate(VQA_FILES.items()):
    questions, annotations = [], []
    for img in range(2):
      image_id = 10 * (s + 1) + img
      h, w = _size(img + s)
      prefix = "COCO_test2015_" if split == "test" else f"COCO_{folder}_"
      data = write_image(os.path.join(root, folder, f"{prefix}{image_id:012d}.jpg"), h, w, seed=image_id)
      for q in range(1 + img):  # two questions share image 1
        qid = image_id * 1000 + q
        question = f"What is thing {q} in image {image_id}?"
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        answers = [f"answer {qid % 7} {k % 3}" for k in range(10)]
        annotations.append(
            {
                "question_type": "what is",
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)
                ],
                "image_id": image_id,
                "answer_type": "other",
                "question_id": qid,
            }
        )
        expected.setdefault(split, {})[qid] = {
            "image_id": str(image_id),
            "question": question,
            "answers": answers if annotated else [],
            "question_type": "what is" if annotated else "",
            "answer_type": "other" if annotated else "",
            "height": h,
            "width": w,
            "bytes": data,
        }
    tag = "test2015" if split == "test" else folder
    write_json(
        os.path.join(root, f"v2_OpenEnded_mscoco_{tag}_questions.json"),
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": tag,
            "questions": questions,
            "license": {},
        },
    )
    if annotated:
      write_json(
          os.path.join(root, f"v2_mscoco_{folder}_annotations.json"),
          {"info": {}, "data_type": "mscoco", "data_subtype": folder, "annotations": annotations},
      )
  return expected


# ---------------------------------------------------------------------------------------------- NLVR2
def write_nlvr2(root: str) -> dict:
  """train/dev/test1 JSON lines; train images nested in numbered folders; some .png files are JPEGs."""
  expected = {}
  for split in ("train", "dev", "test1"):
    lines = []
    for pair in range(2):
      stem = f"{split}-{7 + pair}-{pair}"
      sizes = []
      for k in (0, 1):
        sub = os.path.join(str(pair), "") if split == "train" else ""
        fmt = "JPEG" if (pair + k) % 2 else "PNG"  # a JPEG under a .png name must be sniffed
        h, w = _size(pair + 2 * k)
        data = write_image(os.path.join(root, "images", split, sub, f"{stem}-img{k}.png"), h, w, fmt=fmt, seed=pair + k)
        sizes.append((h, w, data))
      for sent in range(2):
        identifier = f"{stem}-{sent}"
        label = "True" if (pair + sent) % 2 == 0 else "False"
        sentence = f"The {split} statement {sent} about pair {pair}."
        lines.append(
            {
                "validation": {},
                "sentence": sentence,
                "left_url": "http://x/l.jpg",
                "writer": "w1",
                "label": label,
                "right_url": "http://x/r.jpg",
                "synset": "n1",
                "query": "dogs",
                "identifier": identifier,
                "extra_validations": {},
            }
        )
        expected.setdefault(split, {})[identifier] = {
            "sentence": sentence,
            "label": int(label == "True"),
            "sizes": sizes,
        }
    write_jsonl(os.path.join(root, f"{split}.json"), lines)
  return expected


# ---------------------------------------------------------------------------------------------- JSONL
def write_jsonl_captions(root: str) -> dict:
  """train.jsonl (caption and captions forms, one missing image) and val.jsonl, images in pics/."""
  expected = {"train": {}, "val": {}}
  lines = {"train": [], "val": []}
  for i in range(5):
    split = "val" if i == 4 else "train"
    rel = f"pics/{i}.{'png' if i % 2 else 'jpg'}"
    h, w = _size(i)
    if i != 3:
      data = write_image(os.path.join(root, rel), h, w, fmt="PNG" if i % 2 else "JPEG", seed=i)
    rec = (
        {"image": rel, "caption": f"custom caption {i}"}
        if i % 2 == 0
        else {"image": rel, "captions": [f"custom caption {i}a", f"custom caption {i}b"], "image_id": f"img{i}"}
    )
    lines[split].append(rec)
    if i != 3:
      captions = [rec["caption"]] if "caption" in rec else rec["captions"]
      expected[split][str(len(lines[split]))] = {
          "image_id": rec.get("image_id", rel),
          "captions": captions,
          "height": h,
          "width": w,
          "bytes": data,
      }
  for split, recs in lines.items():
    write_jsonl(os.path.join(root, f"{split}.jsonl"), recs)
  return expected


def write_jsonl_vqa(root: str) -> dict:
  """train.jsonl with and without question_id / types, test.jsonl without answers."""
  expected = {"train": {}, "test": {}}
  for split, n in (("train", 3), ("test", 1)):
    lines = []
    for i in range(n):
      rel = os.path.join(root, "imgs", f"{split}{i}.jpg") if i == 0 else f"imgs/{split}{i}.jpg"
      h, w = _size(i)
      data = write_image(rel if os.path.isabs(rel) else os.path.join(root, rel), h, w, seed=i)
      rec = {"image": rel, "question": f"how many things {i}?", "answers": [] if split == "test" else [str(i)] * 3}
      if i == 1:
        rec.update(question_id=555, question_type="how many", answer_type="number")
      lines.append(rec)
      expected[split][rec.get("question_id", i + 1)] = {
          "image_id": rel,
          "question": rec["question"],
          "answers": rec["answers"],
          "question_type": rec.get("question_type", ""),
          "answer_type": rec.get("answer_type", ""),
          "height": h,
          "width": w,
          "bytes": data,
      }
    write_jsonl(os.path.join(root, f"{split}.jsonl"), lines)
  return expected


# ------------------------------------------------------------------- fixtures at a realistic image size
@functools.lru_cache(maxsize=4)
def _sensor_noise(height: int, width: int) -> np.ndarray:
  return np.random.default_rng(0).normal(0.0, 12.0, (height, width, 3)).astype(np.float32)


def photo_bytes(height: int, width: int, *, seed: int) -> bytes:
  """A JPEG with a photo's entropy (smooth colour fields plus sensor-like noise), about 60 KB at 320x427 (COCO's
  640x480 photos: ~136 KB this way, ~160 KB real): large enough beside its texts, and beside the 64 KiB blocks
  an ArrayRecord file is padded to, that a storage ratio measures images, as it would at full scale."""
  rng = np.random.default_rng(seed)
  coarse = Image.fromarray(rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8))
  smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
  noisy = np.clip(smooth + _sensor_noise(height, width), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noisy).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def write_vqa2_scaled(root: str, *, train_images: int, val_images: int, test_images: int, questions: int) -> dict:
  """VQA v2 files with `questions` questions per image (10 answers each) for train and val, and a test2015
  questions file without annotations. Returns {split: {image path: bytes}}."""
  written = {}
  for s, (split, count) in enumerate((("train", train_images), ("val", val_images), ("test", test_images))):
    folder, tag = {"train": ("train2014", "train2014"), "val": ("val2014", "val2014")}.get(
        split, ("test2015", "test2015")
    )
    qs, anns = [], []
    for img in range(count):
      image_id = 100_000 * (s + 1) + img
      path = os.path.join(root, folder, f"COCO_{folder}_{image_id:012d}.jpg")
      data = photo_bytes(320, 427, seed=image_id)
      _write_bytes(path, data)
      written.setdefault(split, {})[path] = data
      for q in range(questions):
        qid = image_id * 10 + q
        qs.append(
            {"image_id": image_id, "question": f"What colour is the thing number {q} on the left?", "question_id": qid}
        )
        answers = [f"colour {(qid + k) % 4}" for k in range(10)]
        anns.append(
            {
                "question_type": "what color is the",
                "multiple_choice_answer": answers[0],
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)
                ],
                "image_id": image_id,
                "answer_type": "other",
                "question_id": qid,
            }
        )
    write_json(os.path.join(root, f"v2_OpenEnded_mscoco_{tag}_questions.json"), {"questions": qs, "data_subtype": tag})
    if split != "test":
      write_json(os.path.join(root, f"v2_mscoco_{folder}_annotations.json"), {"annotations": anns})
  return written


def write_coco_karpathy_scaled(root: str, *, parts: dict[str, int], captions: int = 5) -> dict:
  """dataset_coco.json with parts[p] images of Karpathy part p. Returns {image path: (part, bytes)}."""
  images, written = [], {}
  i = 0
  for part, count in parts.items():
    for _ in range(count):
      cocoid = 500_000 + i
      folder = "train2014" if part == "train" else "val2014"
      filename = f"COCO_{folder}_{cocoid:012d}.jpg"
      data = photo_bytes(320, 427, seed=cocoid)
      _write_bytes(os.path.join(root, folder, filename), data)
      written[os.path.join(root, folder, filename)] = (part, data)
      raws = [f"A person riding a bicycle down street number {i} with caption {k}." for k in range(captions)]
      images.append(
          {
              "filepath": folder,
              "filename": filename,
              "split": part,
              "cocoid": cocoid,
              "sentences": [{"raw": r, "tokens": r.lower().split()} for r in raws],
          }
      )
      i += 1
  write_json(os.path.join(root, "dataset_coco.json"), {"images": images, "dataset": "coco"})
  return written


def write_nlvr2_scaled(root: str, *, pairs: dict[str, int], statements: int) -> dict:
  """NLVR2 JSON lines with `statements` statements per image pair. Returns {image path: bytes}."""
  written = {}
  for split, count in pairs.items():
    lines = []
    for pair in range(count):
      stem = f"{split}-{pair // 4}-{pair % 4}"
      for k in (0, 1):
        path = os.path.join(root, "images", split, str(pair % 10), f"{stem}-img{k}.png")
        data = photo_bytes(320, 427, seed=1000 * len(split) + 2 * pair + k)
        _write_bytes(path, data)
        written[path] = data
      for sent in range(statements):
        lines.append(
            {
                "identifier": f"{stem}-{sent}",
                "sentence": f"The left image shows exactly {sent + 2} dogs and the right one shows none.",
                "label": "True" if (pair + sent) % 2 else "False",
                "left_url": "http://x/l.jpg",
                "right_url": "http://x/r.jpg",
            }
        )
    write_jsonl(os.path.join(root, f"{split}.json"), lines)
  return written
