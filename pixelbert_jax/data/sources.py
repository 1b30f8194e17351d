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

from pixelbert_jax import task_table
from pixelbert_jax.data import builders
from pixelbert_jax.data.builders import layout
from pixelbert_jax.data.config import check_name
from pixelbert_jax.data.schemas import SCHEMAS
from pixelbert_jax.data.split_index import SplitIndex, load_index, sidecar_dir


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

  @property
  def records(self) -> "ConcatSource":
    """The same records without their image bytes (each part's `records`)."""
    return ConcatSource([getattr(s, "records", s) for s in self._sources])


@dataclasses.dataclass(frozen=True)
class _Part:
  """One component's split as opened: what its texts sidecar is loaded from."""

  records: object
  directory: str
  split: str
  name: str


@dataclasses.dataclass
class OpenSplit:
  source: object  # len() and [i] -> record dict with its image bytes; `source.records`: without them
  index: SplitIndex
  name: str  # for messages: 'dataset/split'
  schema: str
  parts: tuple[_Part, ...] = ()  # empty for a split built in memory (tests)

  def with_texts(self) -> SplitIndex:
    """The index with its texts (captions or VQA answers), loaded on first use from the texts sidecar of the
    records opened already (scanned once if it is missing), and kept: the split is not opened again."""
    texts = SCHEMAS[self.schema].texts
    if not texts or getattr(self.index, texts[0].attr) is not None or not self.parts:
      return self.index
    indices = [
        load_index(p.records, schema=self.schema, directory=p.directory, split=p.split, name=p.name, texts=True)
        for p in self.parts
    ]
    self.index = indices[0] if len(indices) == 1 else _concat_index(indices)
    return self.index


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
  layout.check_layout(b)
  if split not in layout.record_splits(b):
    left_out = layout.left_out_message(b, data_cfg.name, split)
    if left_out:
      raise ValueError(left_out)
    return None, layout.record_splits(b)
  missing = SCHEMAS[schema].required - set(b.info.features.keys())
  if missing:
    raise ValueError(
        f"dataset {data_cfg.name!r} ({b.data_dir}) has no {schema} fields {sorted(missing)}: "
        f"it cannot feed a task that reads the {schema} schema"
    )
  name = f"{data_cfg.name}/{split}"
  records, source = layout.open_split(b, split, dataset=data_cfg.name)
  part = _Part(records, sidecar_dir(data_cfg.data_dir, b), split, name)
  index = load_index(  # from the records alone: indexing reads no image
      records, schema=schema, directory=part.directory, split=split, name=name, texts=texts
  )
  return (source, index, name, part), None


def _concat_index(indices: list[SplitIndex]) -> SplitIndex:
  """The indices of a mixture's components, one after the other (arrays concatenated, lists joined)."""

  def join(attr):
    parts = [getattr(i, attr) for i in indices]
    if parts[0] is None:
      return None
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [x for p in parts for x in p]

  fields = [f.name for f in dataclasses.fields(SplitIndex) if f.name != "schema"]
  return SplitIndex(schema=indices[0].schema, **{name: join(name) for name in fields})


def open_split(data_cfg: ml_collections.ConfigDict, task: str, split: str, *, texts: bool = False) -> OpenSplit:
  """The split's records and index for `task` (its schema); texts=True also loads captions / answers (or
  later: `OpenSplit.with_texts`). A run opens each split once, through data/task_data.py."""
  schema = task_table.spec(task).schema
  names = check_name(data_cfg.name)
  if len(names) == 1:
    opened, have = _open_one(data_cfg, schema, split, texts)
    if opened is None:
      raise ValueError(f"dataset {data_cfg.name!r} has no split {split!r}; it has {have}")
    source, index, name, part = opened
    return OpenSplit(source, index, name, schema, (part,))
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
      ConcatSource([o[0] for o in opened]),
      _concat_index([o[1] for o in opened]),
      f"{data_cfg.name}/{split}",
      schema,
      tuple(o[3] for o in opened),
  )
