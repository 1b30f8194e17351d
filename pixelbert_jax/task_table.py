"""The one table of tasks: for each, the data it reads, the model it trains and the module that drives it.

Every part that dispatches on `config.task` looks the task up here: the data pipeline (schema, examples),
`models.build.build_model` (model) and the trainer (the training module, `tasks.Task`, and the
evaluation function, `tasks.Evaluate`). Entries name their classes
and modules by import path and are resolved on use, so this module imports nothing, the data and model
layers never import the task modules, and adding a task is one row here plus the modules it names.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task. `schema` is the TFDS builder family its splits come from (data/builders: `captions`, `vqa`,
  `nlvr2`); `record` is what one record of a split is (what `num_examples` counts); `model` and `examples`
  are "module:Class" paths; `module` is the training module (tasks.Task: pure JAX, no data pipeline) and
  `evaluate` the "module:function" path of its evaluation (tasks.Evaluate)."""

  name: str
  schema: str
  record: str
  model: str
  examples: str
  module: str
  evaluate: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "pretrain",
            schema="captions",
            record="image",
            model="pixelbert_jax.models.heads:PixelBertPretrain",
            examples="pixelbert_jax.data.examples:PretrainExamples",
            module="pixelbert_jax.tasks.pretrain",
            evaluate="pixelbert_jax.tasks.pretrain_eval:evaluate",
        ),
        TaskSpec(
            "vqa",
            schema="vqa",
            record="question",
            model="pixelbert_jax.models.heads:PixelBertVqa",
            examples="pixelbert_jax.data.finetune_examples:VqaExamples",
            module="pixelbert_jax.tasks.vqa",
            evaluate="pixelbert_jax.tasks.vqa_eval:evaluate",
        ),
        TaskSpec(
            "nlvr2",
            schema="nlvr2",
            record="statement",
            model="pixelbert_jax.models.heads:PixelBertNlvr2",
            examples="pixelbert_jax.data.finetune_examples:Nlvr2Examples",
            module="pixelbert_jax.tasks.nlvr2",
            evaluate="pixelbert_jax.tasks.nlvr2_eval:evaluate",
        ),
        TaskSpec(
            "retrieval",
            schema="captions",
            record="image",
            model="pixelbert_jax.models.heads:PixelBertRetrieval",
            examples="pixelbert_jax.data.finetune_examples:RetrievalExamples",
            module="pixelbert_jax.tasks.retrieval",
            evaluate="pixelbert_jax.tasks.retrieval_eval:evaluate",
        ),
    )
}


def spec(task: str) -> TaskSpec:
  """The table's row for `task`; a ValueError that lists the known tasks otherwise."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
  return TASKS[task]


def resolve(path: str) -> Any:
  """The object a "module:Name" path names, or the module of a plain module path."""
  module, _, name = path.partition(":")
  loaded = importlib.import_module(module)
  return getattr(loaded, name) if name else loaded
