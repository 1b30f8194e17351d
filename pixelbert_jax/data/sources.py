"""Opens one split of a dataset, or of a mixture like 'coco_karpathy+visual_genome', with its index.

A mixture is the concatenation of its components' records (in the order named) under one plan. Each
component is built and indexed on its own (its own sidecar), with its manual_dir from
`config.data.manual_dirs.<component>` (falling back to `config.data.manual_dir`). A split of a mixture is
that split of every component that has it (VG has only 'train', so 'val' of coco_karpathy+visual_genome is
COCO's val); a split no component has is an error.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging

import ml_collections
import numpy as np

from pixelbert_jax.data import builders
from pixelbert_jax.data.config import check_name
from pixelbert_jax.data.split_index import SplitIndex, load_index, sidecar_dir

_REQUIRED = {
    "captions": {"image", "image_id", "captions", "height", "width"},
    "vqa": {"image", "question_id", "question", "answers", "height", "width"},
    "nlvr2": {"identifier", "sentence", "label", "image0", "image1", "height0", "width0", "height1", "width1"},
}


class ConcatSource:
  """Random access over several sources, one after the other."""

  def __init__(self, sources: list):
    self._sources = sources
    self._starts = np.cumsum([0] + [len(s) for s in sources]).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} outside [0, {len(self)})")
    k = bisect.bisect_right(self._starts, index) - 1
    return k, index - self._starts[k]

  def __getitem__(self, index: int):
    k, i = self.locate(int(index))
    return self._sources[k][i]

  def __getitems__(self, indices):
    return [self[i] for i in indices]


@dataclasses.dataclass
class OpenSplit:
  source: object  # len() and [i] -> record dict
  index: SplitIndex
  name: str  # for messages: 'dataset/split'
  schema: str


def _component_cfg(data_cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  c = data_cfg.copy_and_resolve_references()
  with c.unlocked():
    c.name = name
    dirs = data_cfg.get("manual_dirs")
    if dirs is not None and dirs.get(name):
      c.manual_dir = dirs[name]
  return c


def _open_one(data_cfg: ml_collections.ConfigDict, schema: str, split: str, texts: bool):
  b = builders.builder(data_cfg, schema)
  if split not in b.info.splits:
    return None, sorted(b.info.splits)
  missing = _REQUIRED[schema] - set(b.info.features.keys())
  if missing:
    raise ValueError(
        f"dataset {data_cfg.name!r} ({b.data_dir}) has no {schema} fields {sorted(missing)}: "
        f"it cannot feed a task that reads the {schema} schema"
    )
  source = b.as_data_source(split)
  name = f"{data_cfg.name}/{split}"
  index = load_index(
      source, schema=schema, directory=sidecar_dir(data_cfg.data_dir, b), split=split, name=name, texts=texts
  )
  return (source, index, name), None


def _concat_index(indices: list[SplitIndex]) -> SplitIndex:
  first = indices[0]
  join = lambda attr: None if getattr(first, attr) is None else [x for i in indices for x in getattr(i, attr)]
  return SplitIndex(
      schema=first.schema,
      sizes=np.concatenate([i.sizes for i in indices]),
      ids=join("ids"),
      question_ids=None if first.question_ids is None else np.concatenate([i.question_ids for i in indices]),
      captions=join("captions"),
      answers=join("answers"),
      question_types=join("question_types"),
      answer_types=join("answer_types"),
  )


def open_split(data_cfg: ml_collections.ConfigDict, task: str, split: str, *, texts: bool = False) -> OpenSplit:
  """The split's records and index for `task` (its schema); texts=True also loads captions / answers."""
  if task not in builders.TASK_SCHEMA:
    raise ValueError(f"unknown task {task!r}; known: {', '.join(builders.TASK_SCHEMA)}")
  schema = builders.TASK_SCHEMA[task]
  names = check_name(data_cfg.name)
  if len(names) == 1:
    opened, have = _open_one(data_cfg, schema, split, texts)
    if opened is None:
      raise ValueError(f"dataset {data_cfg.name!r} has no split {split!r}; it has {have}")
    return OpenSplit(*opened, schema=schema)
  if schema != "captions":
    raise ValueError(
        f"mixture {data_cfg.name!r}: only caption datasets mix (tasks pretrain, retrieval), " f"not task {task!r}"
    )
  opened, absent = [], {}
  for name in names:
    one, have = _open_one(_component_cfg(data_cfg, name), schema, split, texts)
    if one is None:
      absent[name] = have
    else:
      opened.append(one)
  if not opened:
    raise ValueError(
        f"no component of {data_cfg.name!r} has split {split!r}: "
        + "; ".join(f"{n} has {h}" for n, h in absent.items())
    )
  if absent:
    logging.info(
        "%s/%s: taken from %s (%s have no such split)", data_cfg.name, split, [o[2] for o in opened], sorted(absent)
    )
  return OpenSplit(
      ConcatSource([o[0] for o in opened]), _concat_index([o[1] for o in opened]), f"{data_cfg.name}/{split}", schema
  )
