"""Test-session settings, applied before any test module imports jax.

The persistent compilation cache lets the many subprocess runs of the same tiny model (resume, SIGTERM,
two processes, conversion CLIs) reuse compiled programs instead of compiling again: on these 2-core
machines that is most of their time. It changes nothing about what is computed.

Most of what is left is XLA compiling the many small programs once each (a cold suite spent about 60% of
its time there), so the tests compile with `JAX_DISABLE_MOST_OPTIMIZATIONS` (LLVM at -O0, no expensive
passes): a cold suite went from 26 to 18 minutes on 2 cores. The tests compare programs built the same way
(runs, bit for bit) or PyTorch within tolerances derived from the arithmetic, neither of which depends on how
much the compiler optimised. Tests whose time goes into running rather than compiling are marked
`optimized`; the README's demo command and bench/ compile fully optimised.
"""

import os
import pathlib

_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # inherited by the tests' subprocesses
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


@pytest.fixture(autouse=True)
def _optimized_compile_when_marked(request):
  """`@pytest.mark.optimized`: this test's in-process programs compile fully optimised; for the few tests
  whose time goes into running many steps rather than into compiling (test_pixels_are_used, cold: 115 s
  optimised, 180 s at -O0)."""
  if request.node.get_closest_marker("optimized") is None:
    yield
    return
  import jax

  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def pytest_collection_modifyitems(config, items):
  """The slow tests first: pytest-xdist hands tests out in collection order, so a slow one collected last
  would run alone on one worker while the other idles, at the end of every CI run."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
