"""The one table of tasks: for each, the data it reads, the model it trains and the module that drives it.

Every part that dispatches on `config.task` looks the task up here instead of naming tasks: the data pipeline
(schema, examples, the sizes it reads off the data), `models.build` (model, its image inputs), the trainer
(the training module, `tasks.Task`, and the evaluation function, `tasks.Evaluate`) and the PyTorch
conversion (heads and their tensor names). Entries name their classes, functions and modules by import path
and are resolved on use, so this module imports nothing, the data and model layers never import the task
modules, and adding a task is one row here plus the modules it names (docs/development.md).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task. `schema` is the data schema its splits follow (data/schemas.py: `captions`, `vqa`, `nlvr2`);
  `record` is what one record of a split is (what `num_examples` counts); `model` and `examples` are
  "module:Class" paths; `module` is the training module (tasks.Task: pure JAX, no data pipeline) and
  `evaluate` the "module:function" path of its evaluation (tasks.Evaluate).

  `images`: the image inputs of the model, each with its `<key>_mask` (dummy inputs, conversion checks).
  `data_sizes`: the `config.model` sizes whose -1 means "the data's", each the `TaskData` property of that
  name. `torch_heads`: the "module:OBJECT" path of the heads of its PyTorch model (convert/torch_model.py
  `TorchHeads`); `head_rules`: the "module:function" path giving the Flax <-> PyTorch names of those heads
  (convert/model_mapping.py); `bert_heads`: the model carries BERT's own pre-training heads (MLM, ITM), so
  the exported text encoder keeps them (HF `BertForPreTraining`)."""

  name: str
  schema: str
  record: str
  model: str
  examples: str
  module: str
  evaluate: str
  torch_heads: str
  head_rules: str
  images: tuple[str, ...] = ("image",)
  data_sizes: tuple[str, ...] = ("vocab_size",)
  bert_heads: bool = False


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
            torch_heads="pixelbert_jax.convert.torch_model:PRETRAIN_HEADS",
            head_rules="pixelbert_jax.convert.model_mapping:pretrain_head_rules",
            bert_heads=True,
        ),
        TaskSpec(
            "vqa",
            schema="vqa",
            record="question",
            model="pixelbert_jax.models.heads:PixelBertVqa",
            examples="pixelbert_jax.data.finetune_examples:VqaExamples",
            module="pixelbert_jax.tasks.vqa",
            evaluate="pixelbert_jax.tasks.vqa_eval:evaluate",
            torch_heads="pixelbert_jax.convert.torch_model:VQA_HEADS",
            head_rules="pixelbert_jax.convert.model_mapping:vqa_head_rules",
            data_sizes=("vocab_size", "num_answers"),
        ),
        TaskSpec(
            "nlvr2",
            schema="nlvr2",
            record="statement",
            model="pixelbert_jax.models.heads:PixelBertNlvr2",
            examples="pixelbert_jax.data.finetune_examples:Nlvr2Examples",
            module="pixelbert_jax.tasks.nlvr2",
            evaluate="pixelbert_jax.tasks.nlvr2_eval:evaluate",
            torch_heads="pixelbert_jax.convert.torch_model:NLVR2_HEADS",
            head_rules="pixelbert_jax.convert.model_mapping:nlvr2_head_rules",
            images=("image", "image1"),
        ),
        TaskSpec(
            "retrieval",
            schema="captions",
            record="image",
            model="pixelbert_jax.models.heads:PixelBertRetrieval",
            examples="pixelbert_jax.data.finetune_examples:RetrievalExamples",
            module="pixelbert_jax.tasks.retrieval",
            evaluate="pixelbert_jax.tasks.retrieval_eval:evaluate",
            torch_heads="pixelbert_jax.convert.torch_model:RETRIEVAL_HEADS",
            head_rules="pixelbert_jax.convert.model_mapping:retrieval_head_rules",
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
