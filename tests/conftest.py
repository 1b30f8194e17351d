"""Test-session settings, applied before any test module imports jax.

The persistent compilation cache lets the many subprocess runs of the same tiny model (resume, SIGTERM,
two processes, conversion CLIs) reuse compiled programs instead of compiling again: on these 2-core
machines that is most of their time. It changes nothing about what is computed.
"""

import os
import pathlib

_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402  (after the environment above, which must precede any jax import)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data dir per test session: the tiny synthetic world is generated once and shared."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tiny_pretrained(data_dir, tmp_path_factory):
  """A 1-step tiny pre-training workdir, read-only for the tests that load it (predict, visualize)."""
  from pixelbert_jax import train
  from tests import train_helpers as th

  workdir = tmp_path_factory.mktemp("tiny_pretrained")
  train.train_and_evaluate(th.tiny_config(data_dir, total_steps=1), str(workdir))
  return workdir


def pytest_collection_modifyitems(config, items):
  """The slow tests first: pytest-xdist hands tests out in collection order, so a slow one collected last
  would run alone on one worker while the other idles, at the end of every CI run."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
