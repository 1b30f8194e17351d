"""One module per task: what the model is fed, its loss and metrics, and task-specific evaluation."""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("pretrain", "vqa", "nlvr2", "retrieval")


def get_task(name: str) -> ModuleType:
  if name not in TASKS:
    raise ValueError(f"config.task={name!r} is not one of {TASKS}")
  try:
    return importlib.import_module(f"pixelbert_jax.tasks.{name}")
  except ModuleNotFoundError as e:
    if e.name == f"pixelbert_jax.tasks.{name}":
      raise NotImplementedError(f"Task {name!r} has no module pixelbert_jax/tasks/{name}.py yet") from e
    raise
