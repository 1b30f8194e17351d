"""Checks of a training config before anything runs (main.py and train.train_and_evaluate).

A value that would fail later fails here, by key: `log_every_steps=0` was a ZeroDivisionError mid-run,
`total_steps=0` silently meant a full run of `num_epochs`, a negative learning rate trained uphill and
`keep_checkpoints=0` deleted every checkpoint. No JAX here: main calls it before JAX starts.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import ml_collections


class ConfigError(ValueError):
  """One or more bad config values; `problems` holds one line per key."""

  def __init__(self, problems: list[str]):
    super().__init__("\n".join(problems))
    self.problems = problems


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in node.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _walk(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _number(value: Any) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def problems(config: ml_collections.ConfigDict) -> list[str]:
  found = []

  def need(key: str, ok, rule: str) -> None:
    value = config
    for part in key.split("."):
      if value is None or part not in value:
        return  # absent in this task's config: nothing to check
      value = value[part]
    x = _number(value)
    if x is None or math.isnan(x) or not ok(x):
      found.append(f"config.{key}={value!r} must be {rule}")

  for key in ("log_every_steps", "checkpoint_every_steps"):
    need(key, lambda x: x > 0, "> 0")
  need("keep_checkpoints", lambda x: x >= 1, ">= 1 (Orbax would delete every checkpoint)")
  need("total_steps", lambda x: x == -1 or x > 0, "-1 (use num_epochs) or > 0")
  if config.get("total_steps", -1) == -1:
    need("num_epochs", lambda x: x > 0, "> 0 when total_steps is -1")
  for key in ("model.vocab_size", "model.num_answers"):
    need(key, lambda x: x == -1 or (x > 0 and x == int(x)), "-1 (read off the data) or a positive integer")
  for key, value in _walk(config):
    leaf = key.rsplit(".", 1)[-1]
    if leaf.endswith("batch_size"):
      need(key, lambda x: x > 0, "> 0")
    elif leaf == "lr":
      need(key, lambda x: x >= 0, ">= 0")
  return found


def validate(config: ml_collections.ConfigDict) -> None:
  found = problems(config)
  if found:
    raise ConfigError(found)
