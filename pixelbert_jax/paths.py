"""User paths, resolved once where they enter: `~` expanded, relative paths made absolute; URLs kept.

Orbax refuses relative checkpoint paths, and a `~` after `=` on a command line reaches us unexpanded
(bash leaves it alone), so both are resolved before anything is written. The entry points: train.py's
`train_and_evaluate` (workdir and the config's paths, `resolve_config`), predict.Predictor, convert's
`to_torch` / `from_torch`, data.prepare's `prepare`, and TFDS_DATA_DIR in data/config.py.
"""

from __future__ import annotations

import os

import ml_collections

# Every key of a training config that names a user file or folder ('' = unset, kept).
CONFIG_PATH_KEYS = (
    "init_from",
    "init_from_torch",
    "data.data_dir",
    "data.manual_dir",
    "data.exclude_coco_heldout",
    "data.vocab_path",
)


def resolve(path: str) -> str:
  """'~/x' -> '/home/u/x', 'runs/a' -> '/cwd/runs/a'; 'gs://b/x' and '' stay as they are."""
  path = str(path)
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Resolves CONFIG_PATH_KEYS and every `data.manual_dirs.<component>` of `config` in place; absent keys
  are skipped (fine-tuning and pre-training configs differ), so the config.json a run writes holds the
  absolute paths it used, whatever the directory a later `predict` runs from."""
  for key in CONFIG_PATH_KEYS:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node.get(p) if node is not None else None
    if node is not None and isinstance(node.get(leaf), str):
      node[leaf] = resolve(node[leaf])
  dirs = config.get("data", {}).get("manual_dirs")
  if dirs:
    for name in list(dirs.keys()):
      dirs[name] = resolve(dirs[name])
  return config
