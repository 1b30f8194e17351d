"""Loading config files (configs/*.py) by path, the way ml_collections' --config flag does.

The config files are not a Python package (they live beside the package, like big_vision's), so a config
that builds on a sibling loads it by path with this helper.
"""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType


def load_sibling(config_file: str, name: str) -> ModuleType:
  """The module `name`.py in the same folder as `config_file` (pass `__file__`)."""
  path = pathlib.Path(config_file).with_name(f"{name}.py")
  if not path.exists():
    raise FileNotFoundError(f"{config_file} builds on {path}, which does not exist")
  spec = importlib.util.spec_from_file_location(f"pixelbert_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
