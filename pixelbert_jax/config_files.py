"""Loading config files (configs/*.py) by path, the way ml_collections' --config flag does.

The config files are not a Python package (they live beside the package, like big_vision's), so a config
that builds on a sibling loads it by path with this helper. `load_config` is a config with `KEY=VALUE`
overrides, for the tools that take a config without the trainer's flags (conversion, the benchmarks).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
from types import ModuleType

import ml_collections


def load_sibling(config_file: str, name: str) -> ModuleType:
  """The module `name`.py in the same folder as `config_file` (pass `__file__`)."""
  path = pathlib.Path(config_file).with_name(f"{name}.py")
  if not path.exists():
    raise FileNotFoundError(f"{config_file} builds on {path}, which does not exist")
  spec = importlib.util.spec_from_file_location(f"pixelbert_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """`configs/pretrain.py:r50` plus `KEY=VALUE` overrides (`model.hidden_size=32`), typed like the field."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location("pixelbert_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise ValueError(f"override {key}: no such config field")
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(f"override {key}: no such config field")
    old = node[leaf]
    node[leaf] = (
        value.lower() in ("1", "true", "yes")
        if isinstance(old, bool)
        else type(old)(value)
        if isinstance(old, (int, float)) and not isinstance(old, bool)
        else ast.literal_eval(value)
        if isinstance(old, (list, tuple))
        else value
    )
  return config
