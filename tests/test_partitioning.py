import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pixelbert_jax import partitioning


@pytest.mark.parametrize(
    "req,n,expected",
    [((-1, 1, 1), 8, (8, 1, 1)), ((4, 1, 2), 8, (4, 1, 2)), ((2, -1, 1), 8, (2, 4, 1)), ((1, 1, -1), 1, (1, 1, 1))],
)
def test_mesh_shape(req, n, expected):
  assert partitioning.mesh_shape(req, n) == expected


@pytest.mark.parametrize(
    "req,n,msg",
    [
        ((-1, -1, 1), 8, "at most one -1"),
        ((3, 1, 1), 8, "multiple of 3"),
        ((2, 2, 1), 8, "uses 4 devices"),
        ((1, 1), 1, "3 entries"),
    ],
)
def test_mesh_shape_errors(req, n, msg):
  with pytest.raises(ValueError, match=msg):
    partitioning.mesh_shape(req, n)


class _FakeMesh:
  shape = {"data": 2, "fsdp": 4, "tensor": 2}


def test_fit_spec_replicates_dims_the_mesh_does_not_divide():
  m = _FakeMesh()
  assert partitioning._fit_spec(P("fsdp", "tensor"), (8, 6), m) == P("fsdp", "tensor")
  assert partitioning._fit_spec(P("fsdp", "tensor"), (6, 5), m) == P(None, None)
  assert partitioning._fit_spec(P(("data", "fsdp"), None), (4, 3), m) == P("data", None)
  assert partitioning._fit_spec(P(None, None, None, "fsdp"), (7, 7, 3, 64), m) == P(None, None, None, "fsdp")


def test_logical_rules_name_only_mesh_axes():
  for _, axes in partitioning.LOGICAL_AXIS_RULES:
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    assert set(names) <= set(partitioning.MESH_AXES)
