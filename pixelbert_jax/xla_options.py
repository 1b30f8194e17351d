"""XLA compile options for the library's jitted computations, by platform (`jax.jit(compiler_options=)`).

CPU: XLA packs every temporary of a computation into one buffer, which the CPU runtime allocates anew on
each call (212 MB per device for a demo train step). glibc serves any request above 32 MiB with a fresh
`mmap`, so every step faulted in and zeroed all of it again: about 100k page faults and 150 ms of kernel
time per demo step, a quarter of its CPU time (bench/HISTORY.md item 28). With heaps of at most 24 MiB each
request stays under glibc's mmap threshold and the allocator hands the same pages back step after step.
Only where the temporaries live changes, not the computation: results are bit-identical. The constraint is
soft: a single larger tensor still gets a heap of its own.

JAX's persistent compilation cache cannot store an executable with several temporary buffers (it fails
with "Multiple temp buffer allocations found"). A process that enabled the cache (`jax_compilation_cache_dir`,
e.g. through JAX_COMPILATION_CACHE_DIR) asked for compiled programs to be reused across runs, so it gets
XLA's single buffer and a log line saying so; unset the cache to get the heaps. A heap size of your own
in XLA_FLAGS (`--xla_multiheap_size_constraint_per_heap=N`, -1 for one buffer) is left to apply.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

CPU_HEAP_BYTES = 24 << 20  # the demo step at batch 32 per device has single buffers of 19 MiB
_HEAP_OPTION = "xla_multiheap_size_constraint_per_heap"


@functools.cache
def _cpu_accepts_heap_option() -> bool:
  """Whether this jaxlib knows the option: a newer XLA may rename it, and a jit with an unknown compile
  option fails outright, so it is probed once rather than breaking every step."""
  probe = jax.jit(lambda x: x + 1, compiler_options={_HEAP_OPTION: CPU_HEAP_BYTES})
  try:
    probe.lower(jax.device_put(np.float32(0), jax.devices("cpu")[0])).compile()
  except Exception as e:  # noqa: BLE001 - jaxlib raises its own runtime error type
    logging.warning(
        "this jaxlib rejects the XLA option %s (%s); CPU steps will allocate their temporaries "
        "with mmap on every call, which costs time, not correctness",
        _HEAP_OPTION,
        e,
    )
    return False
  return True


def compiler_options(platform: str | None = None) -> dict[str, int]:
  """Options for a computation that runs on `platform` (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  if platform != "cpu" or _HEAP_OPTION in os.environ.get("XLA_FLAGS", ""):
    return {}
  if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
    _note_cache_wins(jax.config.jax_compilation_cache_dir)
    return {}
  return {_HEAP_OPTION: CPU_HEAP_BYTES} if _cpu_accepts_heap_option() else {}


@functools.cache
def _note_cache_wins(cache_dir: str) -> None:
  logging.info(
      "CPU programs compile without %s=%d (XLA's one temporary buffer, mapped afresh on every "
      "call): the persistent compilation cache at %s cannot store them otherwise",
      _HEAP_OPTION,
      CPU_HEAP_BYTES,
      cache_dir,
  )
