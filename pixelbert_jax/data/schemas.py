"""The stored data schemas (`captions`, `vqa`, `nlvr2`): what one record of each holds, written once.

A task reads one schema (task_table.py `schema`), and every dataset's builds follow one or more of them
(data/datasets.py). The builders store a schema's `features` (plus the image table's, builders/layout.py);
`data/sources.py` refuses a build that lacks one of its `required` fields; `data/split_index.py` reads its
`sizes`, `id_key` and `texts` off every record into the split's sidecar files. TensorFlow Datasets is
imported by `features` alone, so that the split index, which reads these tables, stays NumPy only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Field kinds and the TFDS feature each is stored as (`Schema.features`).
KINDS = ("ref", "text", "texts", "int32", "int64")  # ref: a row of the image table (layout.py)


@dataclasses.dataclass(frozen=True)
class TextColumn:
  """One text of every record that the split index loads only when texts are asked for (captions, VQA
  answers): record field `key`, `SplitIndex` attribute `attr`, arrays `<sidecar>_*` of `<split>.texts.npz`;
  `many`: a list of strings per record, else one string ('' where the record has none)."""

  key: str
  attr: str
  sidecar: str
  many: bool


@dataclasses.dataclass(frozen=True)
class Schema:
  """`fields`: every record field and its kind (KINDS); `optional`: the fields a build may lack (a task of
  this schema reads the others, `required`); `sizes`: the stored image sizes, height then width of each image
  in order, which plan the batches; `id_key`: the field that names a record in result files and messages;
  `int_ids`: where those ids are integers, the int64 array of them the index also keeps (attribute and
  sidecar key); `texts`: what `texts=True` adds to the index."""

  name: str
  fields: dict[str, str]
  sizes: tuple[str, ...]
  id_key: str
  optional: tuple[str, ...] = ()
  int_ids: str = ""
  texts: tuple[TextColumn, ...] = ()

  def __post_init__(self):
    bad = {k: v for k, v in self.fields.items() if v not in KINDS}
    missing = [k for k in self.sizes + (self.id_key,) + self.optional if k not in self.fields]
    if bad or missing or len(self.sizes) % 2:
      raise ValueError(f"schema {self.name!r}: kinds {bad}, unknown fields {missing}, sizes {self.sizes}")

  @property
  def required(self) -> frozenset[str]:
    return frozenset(self.fields) - set(self.optional)

  def features(self, **extra: Any):
    """The `tfds.features.FeaturesDict` of a build of this schema: the image table's fields, the record's,
    then `extra` (a builder's own fields, e.g. the synthetic world's grounding labels)."""
    import numpy as np
    import tensorflow_datasets as tfds

    from pixelbert_jax.data.builders import layout

    kinds = {
        "ref": layout.ref_feature,
        "text": tfds.features.Text,
        "texts": lambda: tfds.features.Sequence(tfds.features.Text()),
        "int32": lambda: tfds.features.Scalar(dtype=np.int32),
        "int64": lambda: tfds.features.Scalar(dtype=np.int64),
    }
    return tfds.features.FeaturesDict(
        {**layout.table_features(), **{k: kinds[kind]() for k, kind in self.fields.items()}, **extra}
    )


SCHEMAS: dict[str, Schema] = {
    s.name: s
    for s in (
        Schema(
            "captions",
            fields={"image_index": "ref", "image_id": "text", "captions": "texts", "height": "int32", "width": "int32"},
            sizes=("height", "width"),
            id_key="image_id",
            texts=(TextColumn("captions", "captions", "captions", many=True),),
        ),
        Schema(
            "vqa",
            fields={
                "image_index": "ref",
                "image_id": "text",
                "question_id": "int64",
                "question": "text",
                "answers": "texts",
                "question_type": "text",
                "answer_type": "text",
                "height": "int32",
                "width": "int32",
            },
            sizes=("height", "width"),
            id_key="question_id",
            optional=("image_id", "question_type", "answer_type"),
            int_ids="question_ids",
            texts=(
                TextColumn("answers", "answers", "answers", many=True),
                TextColumn("question_type", "question_types", "qtypes", many=False),
                TextColumn("answer_type", "answer_types", "atypes", many=False),
            ),
        ),
        Schema(
            "nlvr2",
            fields={
                "identifier": "text",
                "sentence": "text",
                "label": "int32",
                "image0_index": "ref",
                "image1_index": "ref",
                "height0": "int32",
                "width0": "int32",
                "height1": "int32",
                "width1": "int32",
            },
            sizes=("height0", "width0", "height1", "width1"),
            id_key="identifier",
        ),
    )
}


def schema(name: str) -> Schema:
  """The schema called `name`; a ValueError that lists the known ones otherwise."""
  if name not in SCHEMAS:
    raise ValueError(f"unknown schema {name!r}; known: {', '.join(SCHEMAS)}")
  return SCHEMAS[name]
