"""User paths, resolved once where they enter: `~` expanded, relative paths made absolute; URLs kept.

Orbax refuses relative checkpoint paths, and a `~` after `=` on a command line reaches us unexpanded
(bash leaves it alone), so both are resolved before anything is written.
"""
from __future__ import annotations

import os


def resolve(path: str) -> str:
  """'~/x' -> '/home/u/x', 'runs/a' -> '/cwd/runs/a'; 'gs://b/x' and '' stay as they are."""
  path = str(path)
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))
