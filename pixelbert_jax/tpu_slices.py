"""TPU slices as Cloud TPU names them (v4-32, v5litepod-64, v5p-8, v6e-16): their chips, the topology
libtpu compiles for, and what one device can hold and compute. Used by the planner (aot.py) on a machine
with no TPU: nothing here needs one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re


class PlanError(ValueError):
  """Bad input to the plan; one line naming the flag or key."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: its topology family, how JAX sees a chip, and its dense bf16 peak per chip."""

  family: str  # jax.experimental.topologies' name prefix
  cores_in_name: bool  # the accelerator type counts TensorCores (v4-8 = 4 chips), not chips
  chip_config: str | None  # "megacore": one JAX device per chip, as on the real slice
  peak_flops: float  # bf16, per chip (the vendor's figure)
  hbm_gib: int  # per chip (the vendor's figure)
  dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
  # What libtpu 0.0.42.1 lets one program use per JAX device (usable_hbm() below, uncapped): the planner
  # reads it off libtpu, except under --screen, which caps libtpu's HBM and so needs it from here
  # (tests/test_aot.py checks the two agree on the installed libtpu).
  usable_gib: float


CHIPS = {
    "v4": Chip("v4", True, "megacore", 275e12, 32, 3, 30.75),
    "v5p": Chip("v5p", True, "megacore", 459e12, 95, 3, 95.74),
    "v5litepod": Chip("v5e", False, None, 197e12, 16, 2, 15.75),
    "v5e": Chip("v5e", False, None, 197e12, 16, 2, 15.75),
    "v6e": Chip("v6e", False, None, 918e12, 32, 2, 31.25),
}


def parse_slice(name: str) -> tuple[Chip, str, int]:
  """'v4-32' -> (chip, 'v4:2x2x4', 16 chips)."""
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
  if not m:
    raise PlanError(f"--topology={name!r}: expected an accelerator type like v4-32, v5litepod-16, v5p-8, v6e-16")
  chip, n = CHIPS[m.group(1)], int(m.group(2))
  chips = n // 2 if chip.cores_in_name else n
  smallest = 4 if chip.dims == 3 else 1
  if chips < smallest or chips & (chips - 1) or (chip.cores_in_name and n % 2):
    raise PlanError(
        f"--topology={name!r}: {chips} chips is not a slice of {m.group(1)} (a power of two, at least {smallest})"
    )
  return chip, f"{chip.family}:{'x'.join(map(str, slice_shape(chips, chip.dims)))}", chips


def slice_shape(chips: int, dims: int) -> list[int]:
  """The box a slice's chips form: v4/v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v5e/v6e 1x1, 1x2, 2x2,
  2x4, 4x4, 4x8, ... (the smallest axis doubles, the last of equals first)."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  return shape


def quiet_libtpu(accelerator_type: str) -> None:
  """This machine is no TPU VM: JAX stays on the CPU, and libtpu is told what it would otherwise probe for
  (without these it prints start-up warnings about missing TPU metadata)."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu takes a lock file per machine; compiling needs no TPU, so several planners may run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def usable_hbm(devices) -> float | None:
  """The bytes libtpu lets one program use on one device, read off its refusal of a 1 TiB program."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from pixelbert_jax import partitioning

  mesh = partitioning.make_mesh((-1, 1, 1), devices[:1])
  one = NamedSharding(mesh, P())
  try:
    jax.jit(lambda x: jnp.zeros((1 << 40,), jnp.int8) + x, out_shardings=one).lower(
        jax.ShapeDtypeStruct((), jnp.int8, sharding=one)
    ).compile()
  except Exception as e:  # noqa: BLE001 - XLA's runtime error
    m = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(e))
    if m:
      return float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024
  return None
