"""`config.init_hook`: a project's own initialisation stage, which train.py runs without knowing what it is.

The config names it as 'package.module:function' ('' for none). train.py imports it before the run starts
(a name that does not import is a one-line config error) and calls it once, on a run that starts from
scratch (no checkpoint to resume, no `init_from` / `init_from_torch`), after the state is initialised and
before step 1:

  function(trainer, state, should_stop) -> (state, metrics)

`trainer` is the run's train.Trainer (its config, mesh, data and state shardings); the returned state is
trained from, and `metrics` (a dict of floats, possibly empty) go to metrics.jsonl at step 0. The hook asks
`should_stop()` (true after SIGTERM or Ctrl-C) as often as it likes and, when it answers true, raises
`Stopped`: the run then exits cleanly having saved nothing, and a rerun starts from scratch, hook included.
The demo's CNN warm start (pixelbert_jax/demo/warm_start.py) is one.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pixelbert_jax.config_checks import INIT_HOOK_NAME, ConfigError

Hook = Callable[[Any, dict, Callable[[], bool]], "tuple[dict, dict[str, float]]"]


class Stopped(Exception):
  """A hook stopped by `should_stop`: `what` names the stage in the log, `progress` says how far it got."""

  def __init__(self, what: str, progress: str):
    super().__init__(f"{what} stopped ({progress})")
    self.what, self.progress = what, progress


def resolve(name: str) -> Hook | None:
  """The function `name` ('package.module:function') names, imported; None for ''. A name that does not
  import is a ConfigError (one line naming the key), as a bad config value is."""
  if not name:
    return None
  if not INIT_HOOK_NAME.fullmatch(name):
    raise ConfigError(f"config.init_hook={name!r} must be '' or 'package.module:function'")
  module_name, _, function = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"config.init_hook={name!r} must name an importable module: {e}") from None
  hook = getattr(module, function, None)
  if not callable(hook):
    raise ConfigError(f"config.init_hook={name!r} must name a function: {module_name} has no {function!r}")
  return hook
