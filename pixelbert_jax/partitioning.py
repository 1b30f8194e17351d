"""Device mesh, logical axis rules and the shardings derived from them.

The model names every parameter and activation axis logically (docs/contracts.md); this module is the only
place that says which mesh axis each logical name lands on. The mesh has three axes:
`data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer state sharded), and
`tensor` (intra-layer model parallelism). Sizes come from config; -1 means "all remaining devices".
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pixelbert_jax import config_checks

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters: FSDP shards the hidden ("embed") and conv output dims; tensor parallelism the wide ones.
# Activations: only the batch is sharded by default (over both data-parallel axes); the MLP / heads
# activations follow the tensor-parallel parameters so no all-gather is needed inside a layer.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_kv", "tensor"),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_channels", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("kv", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("classes", None),
    ("position", None),
)


def mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves -1 entries (at most one) so that the product equals `num_devices`."""
  requested = tuple(int(s) for s in requested)
  if len(requested) != len(MESH_AXES):
    raise config_checks.ConfigError(
        f"config.mesh_shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {requested}"
    )
  if sum(s == -1 for s in requested) > 1:
    raise config_checks.ConfigError(f"config.mesh_shape may contain at most one -1, got {requested}")
  if any(s == 0 or s < -1 for s in requested):
    raise config_checks.ConfigError(f"config.mesh_shape entries must be positive or -1, got {requested}")
  fixed = math.prod(s for s in requested if s != -1)
  if num_devices % fixed:
    raise config_checks.ConfigError(
        f"config.mesh_shape {dict(zip(MESH_AXES, requested))} needs a multiple of {fixed} devices, "
        f"but {num_devices} are available"
    )
  shape = tuple(num_devices // fixed if s == -1 else s for s in requested)
  if math.prod(shape) != num_devices:
    raise config_checks.ConfigError(
        f"config.mesh_shape {dict(zip(MESH_AXES, shape))} uses {math.prod(shape)} devices, "
        f"but {num_devices} are available"
    )
  return shape


def make_mesh(requested: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(requested, len(devices))
  # Mesh(...) rather than jax.make_mesh: the latter defaults to Explicit axis types on newer jax, and the
  # model relies on GSPMD propagation from logical constraints (Auto axes).
  try:
    from jax.experimental import mesh_utils

    device_grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_grid = np.asarray(devices).reshape(shape)
  return Mesh(device_grid, MESH_AXES)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (odd vocab sizes, 3 input channels...).

  jit refuses shardings that do not divide the array, so such a dim is replicated instead; this is
  decided per parameter from static shapes, so every process computes the same layout.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for name in names:
      size = math.prod(mesh.shape[a] for a in kept + [name])
      if dim % size == 0:
        kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def logical_to_shardings(abstract_tree: Any, logical_specs: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """Maps a tree of logical PartitionSpecs (with the matching abstract arrays) to NamedShardings."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)

  def one(leaf, spec):
    spec = P() if spec is None else spec
    return NamedSharding(mesh, _fit_spec(spec, np.shape(leaf), mesh))

  return jax.tree.map(one, abstract_tree, mesh_specs, is_leaf=lambda x: isinstance(x, P) or x is None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Iterator[None]:
  """The context every jitted model call is traced in: the mesh and the logical rules.

  Without both, flax's `with_logical_constraint` is silently a no-op and GSPMD has to guess activation
  layouts from the parameters alone.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over both data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Builds global arrays from each process's local slice of the batch (one slice per process)."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v) for k, v in local_batch.items()
  }


def log_mesh(mesh: Mesh) -> None:
  logging.info(
      "Mesh %s over %d devices (%s), %d process(es)",
      dict(mesh.shape),
      mesh.size,
      jax.devices()[0].platform,
      jax.process_count(),
  )
