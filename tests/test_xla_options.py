"""The library's XLA compile options: CPU temporaries split into heaps that glibc reuses, same results."""

import logging
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelbert_jax import xla_options


def _chain(x):
  a = x @ x
  b = jnp.tanh(a) @ x
  return (a * b) @ jax.nn.sigmoid(x) + a - b  # four live 9 MiB temporaries at [1536, 1536]


def _temp_allocations(dump_dir: pathlib.Path) -> list[int]:
  (text,) = [p.read_text() for p in dump_dir.glob("*buffer-assignment.txt")]
  return [int(s) for s in re.findall(r"^allocation \d+: size (\d+), preallocated-temp", text, re.M)]


@pytest.fixture
def heaps_on():
  """conftest enables JAX's persistent compilation cache, and a process with the cache gets no heaps."""
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  yield
  jax.config.update("jax_compilation_cache_dir", before)


def test_options_by_platform(heaps_on):
  assert xla_options.compiler_options("cpu") == {"xla_multiheap_size_constraint_per_heap": xla_options.CPU_HEAP_BYTES}
  assert xla_options.compiler_options("gpu") == {}
  assert xla_options.compiler_options("tpu") == {}


def test_a_heap_size_in_xla_flags_is_left_to_apply(heaps_on, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_multiheap_size_constraint_per_heap=-1")
  assert xla_options.compiler_options("cpu") == {}


def test_the_persistent_compilation_cache_wins_and_says_so(caplog):
  assert jax.config.jax_compilation_cache_dir  # conftest's
  xla_options._note_cache_wins.cache_clear()
  with caplog.at_level(logging.INFO):
    assert xla_options.compiler_options("cpu") == {}
  assert "persistent compilation cache" in caplog.text and jax.config.jax_compilation_cache_dir in caplog.text


@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")  # the heaps' program
def test_cpu_heaps_stay_under_glibc_mmap_threshold_and_change_no_result(tmp_path, heaps_on):
  x = jax.random.normal(jax.random.key(0), (1536, 1536))
  # A persistent-cache hit (the cache conftest opened stays open) would skip the compile and its dump:
  # a constant unique to this run keeps the program new.
  salt = np.float32(1 + time.time_ns() % 1_000_003 / 1_000_003)
  outputs = {}
  for name, options in (("default", {}), ("library", xla_options.compiler_options("cpu"))):
    dump = tmp_path / name
    fn = jax.jit(lambda x: _chain(x * salt), compiler_options={**options, "xla_dump_to": str(dump)})
    compiled = fn.lower(x).compile()
    outputs[name] = np.asarray(compiled(x))
    outputs[name + "_temps"] = _temp_allocations(dump)
  assert outputs["default_temps"] == [4 * 1536 * 1536 * 4]  # XLA's default: one 36 MiB buffer -> mmap
  assert len(outputs["library_temps"]) > 1
  assert max(outputs["library_temps"]) <= xla_options.CPU_HEAP_BYTES < 32 << 20  # glibc's mmap ceiling
  np.testing.assert_array_equal(outputs["library"], outputs["default"])


def test_a_jaxlib_without_the_option_gets_none_and_a_warning(monkeypatch, caplog, heaps_on):
  monkeypatch.setattr(xla_options, "_HEAP_OPTION", "xla_no_such_option_for_this_test")
  xla_options._cpu_accepts_heap_option.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert xla_options.compiler_options("cpu") == {}
    assert "xla_no_such_option_for_this_test" in caplog.text
  finally:
    xla_options._cpu_accepts_heap_option.cache_clear()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Error writing persistent compilation cache entry")
def test_a_train_step_with_heaps_is_bit_identical(data_dir):
  """The tiny demo step (192x192 images) has 31 MiB of temporaries (checked below), so the heaps split them."""
  from flax import traverse_util

  from pixelbert_jax import partitioning
  from pixelbert_jax.data import pipeline
  from pixelbert_jax.train import Trainer
  from tests import train_helpers as th

  config = th.tiny_config(data_dir, total_steps=1)
  batch = next(
      pipeline.make_iterator(config.data, "pretrain", "train", batch_size=config.batch_size, seed=0, train=True)
  )
  mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
  results = {}
  cache_dir = jax.config.jax_compilation_cache_dir
  for name, cache in (("one buffer", cache_dir), ("heaps", None)):
    jax.config.update("jax_compilation_cache_dir", cache)
    try:
      trainer = Trainer(config, mesh)
    finally:
      jax.config.update("jax_compilation_cache_dir", cache_dir)
    results[name] = trainer.compiler_options
    with partitioning.activate(mesh):
      state, device_batch = trainer.init_state(config.seed), partitioning.global_batch(batch, mesh)
      if name == "one buffer":  # more temporaries than one heap holds, or there is nothing to split
        compiled = trainer.train_step.lower(state, device_batch).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp > xla_options.CPU_HEAP_BYTES, temp  # 31 MiB: at least two heaps
      state, _ = trainer.train_step(state, device_batch)
    results[name + " params"] = traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")
  assert results["one buffer"] == {}
  assert results["heaps"] == {"xla_multiheap_size_constraint_per_heap": xla_options.CPU_HEAP_BYTES}
  assert results["heaps params"].keys() == results["one buffer params"].keys()
  for k, v in results["heaps params"].items():
    np.testing.assert_array_equal(v, results["one buffer params"][k], err_msg=k)
