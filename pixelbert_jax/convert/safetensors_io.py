"""Tensor files in and out without torch and without a second copy on the host.

`write_safetensors` streams one tensor at a time into the file (the header is computed from the shapes
up front), so exporting a model never builds the whole converted state dict in memory.
`read_safetensors` validates the header against the file size and returns copy-on-write memory maps,
so importing reads pages only as each tensor is converted. `read_torch_pickle` reads `.pth`/`.pt`/`.bin`
with `torch.load(weights_only=True)` only, and accepts nothing but a flat {name: tensor} dict.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import numpy as np

# safetensors dtype names <-> NumPy; bfloat16 comes from ml_dtypes (a jax dependency).
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
try:
  import ml_dtypes

  _DTYPES["BF16"] = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover - jax always brings ml_dtypes
  pass
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class TensorFileError(ValueError):
  """A tensor file that is missing, truncated, or not what it claims to be (message names the file)."""


def write_safetensors(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, tuple, np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
  """Writes `path` from `specs` (name, shape, dtype), calling `produce(name)` for one tensor at a time.

  Each produced array must have exactly the announced shape and dtype. Returns the bytes written.
  The file appears under its final name only when complete (written to `path.partial`, then renamed).
  """
  specs = list(specs)
  header, offset = {}, 0
  for name, shape, dtype in specs:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
      raise TensorFileError(f"{path}: {name}: dtype {dtype} has no safetensors name")
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
    offset += size
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
  tmp = f"{os.fspath(path)}.partial"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in specs:
      arr = np.asarray(produce(name))
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise TensorFileError(
            f"{path}: {name}: produced {arr.dtype}{list(arr.shape)}, announced " f"{np.dtype(dtype)}{list(shape)}"
        )
      f.write(np.ascontiguousarray(arr).data)  # little-endian on every platform jax supports
  os.replace(tmp, path)
  return 8 + len(blob) + offset


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
  """-> (tensors {name: {dtype, shape, data_offsets}}, metadata, data start). Checks everything that
  can be checked without reading the data: sizes, offsets, dtypes, and that the file is long enough."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TensorFileError(f"{path}: no such file")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise TensorFileError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise TensorFileError(f"{path}: not a safetensors file or truncated (header length {n}, " f"file size {size})")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise TensorFileError(f"{path}: unreadable safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise TensorFileError(f"{path}: safetensors header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  start, end = 8 + n, 0
  for name, info in header.items():
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
      raise TensorFileError(f"{path}: {name}: malformed header entry {info!r}")
    if info["dtype"] not in _DTYPES:
      raise TensorFileError(f"{path}: {name}: unsupported dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
    if hi - lo != want or lo < 0:
      raise TensorFileError(
          f"{path}: {name}: data_offsets {lo}..{hi} do not fit shape {info['shape']} " f"{info['dtype']}"
      )
    end = max(end, hi)
  if start + end > size:
    raise TensorFileError(f"{path}: truncated safetensors file: {size} bytes, the header needs " f"{start + end}")
  return header, metadata, start


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} as copy-on-write memory maps of `path` (nothing is read until used)."""
  header, _, start = read_safetensors_header(path)
  out = {}
  for name, info in header.items():
    lo, _ = info["data_offsets"]
    dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(info["shape"])
    if int(np.prod(shape, dtype=np.int64)) == 0:
      out[name] = np.zeros(shape, dtype)
    else:
      out[name] = np.memmap(path, dtype=dtype, mode="c", offset=start + lo, shape=shape)
  return out


def read_torch_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A `.pth`/`.pt`/`.bin` state dict via `torch.load(weights_only=True)`: flat {str: Tensor} only."""
  import pickle

  import torch

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TensorFileError(f"{path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
  except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TensorFileError(
        f"{path}: not a plain state dict readable with torch.load(weights_only=True): " f"{first}"
    ) from None
  if not isinstance(obj, dict):
    raise TensorFileError(f"{path}: holds a {type(obj).__name__}, not a state dict {{name: tensor}}")
  out = {}
  for k, v in obj.items():
    if not isinstance(k, str) or not isinstance(v, torch.Tensor):
      raise TensorFileError(
          f"{path}: key {k!r} holds a {type(v).__name__}, not a tensor: not a plain "
          "state dict (a training checkpoint? save model.state_dict() instead)"
      )
    out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
  return out


def _is_zip(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PK\x03\x04"


def read_tensor_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """By extension: `.safetensors` (memory-mapped) or a torch pickle (`.pth`, `.pt`, `.bin`)."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith((".pth", ".pt", ".bin")):
    return read_torch_pickle(path)
  raise TensorFileError(f"{path}: unknown weight file type (expected .safetensors, .pth, .pt or .bin)")
