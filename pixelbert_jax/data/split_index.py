"""Per-split sidecar files: what the plan and the evaluators need from every record, read once.

Planning needs each record's bucket, i.e. its stored height/width; VQA needs every answer (vocabulary,
ground truth), retrieval every caption. Reading them means reading every record (with its image bytes) once,
so the result is cached next to the data in `<data_dir>/pixelbert_index/<builder>/<config>/<version>/`:
- `<split>.meta.npz`: sizes (int32 [n,2], or [n,4] for image pairs) and the record ids (image_id,
  question_id or identifier). A few bytes per record.
- `<split>.texts.npz`: captions (captions schema) or answers + question/answer types (vqa schema), built only
  when a task asks for texts (retrieval, VQA vocabulary and ground truth).
A sidecar whose record count differs from the split (the dataset was rebuilt) is rebuilt; one in a format
this code does not know is rejected with its path named.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from pixelbert_jax.data import schemas
from pixelbert_jax.data.schemas import Schema, TextColumn

FORMAT = 1
_CHUNK = 256


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def pack_strings(strings: list[str]) -> dict[str, np.ndarray]:
  """A list of strings as one UTF-8 blob plus offsets (numpy 'U' arrays pad every string to the longest)."""
  encoded = [s.encode("utf-8") for s in strings]
  offsets = np.zeros(len(encoded) + 1, np.int64)
  offsets[1:] = np.cumsum([len(e) for e in encoded])
  return {"blob": np.frombuffer(b"".join(encoded), np.uint8), "offsets": offsets}


def unpack_strings(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
  data = blob.tobytes()
  return [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def _ragged(lists: list[list[str]], prefix: str) -> dict[str, np.ndarray]:
  flat = [s for strings in lists for s in strings]
  packed = pack_strings(flat)
  counts = np.zeros(len(lists) + 1, np.int64)
  counts[1:] = np.cumsum([len(s) for s in lists])
  return {f"{prefix}_blob": packed["blob"], f"{prefix}_offsets": packed["offsets"], f"{prefix}_rows": counts}


def _unragged(data, prefix: str) -> list[list[str]]:
  flat = unpack_strings(data[f"{prefix}_blob"], data[f"{prefix}_offsets"])
  rows = data[f"{prefix}_rows"]
  return [flat[rows[i] : rows[i + 1]] for i in range(len(rows) - 1)]


@dataclasses.dataclass
class SplitIndex:
  """Cached per-record metadata of one split (which fields a schema fills: data/schemas.py). `texts` fields
  are None unless asked for."""

  schema: str
  sizes: np.ndarray  # int32 [n, 2] (h, w), or [n, 4] (h0, w0, h1, w1) for nlvr2
  ids: list[str]  # image_id (captions), str(question_id) (vqa), identifier (nlvr2)
  question_ids: np.ndarray | None = None  # int64 [n], vqa
  captions: list[list[str]] | None = None  # captions schema, with texts
  answers: list[list[str]] | None = None  # vqa schema, with texts
  question_types: list[str] | None = None
  answer_types: list[str] | None = None

  def __len__(self) -> int:
    return len(self.sizes)


def _sizes(record, schema: Schema, where: str) -> list[int]:
  out = []
  for k in schema.sizes:
    if k not in record:
      raise KeyError(f"{where}: no {k!r} key (keys: {sorted(record)}); the plan needs stored image sizes")
    out.append(int(record[k]))
  if min(out) <= 0:
    raise ValueError(f"{where}: stored image size {out} is not positive")
  return out


def _text(record, column: TextColumn):
  if column.many:
    return [_str(t) for t in record[column.key]]
  return _str(record.get(column.key, ""))  # an optional field: '' where a build does not store it


def _scan(source, schema: Schema, name: str, texts: bool) -> tuple[dict, dict | None]:
  n = len(source)
  sizes = np.zeros((n, len(schema.sizes)), np.int32)
  ids: list[str] = []
  int_ids = np.zeros(n, np.int64)
  columns = {c.attr: [] for c in schema.texts} if texts else {}
  t0 = time.monotonic()
  for start in range(0, n, _CHUNK):
    indices = list(range(start, min(n, start + _CHUNK)))
    records = source.__getitems__(indices) if hasattr(source, "__getitems__") else [source[i] for i in indices]
    for i, rec in zip(indices, records):
      sizes[i] = _sizes(rec, schema, f"{name}[{i}]")
      if schema.int_ids:
        int_ids[i] = int(rec[schema.id_key])
        ids.append(str(int_ids[i]))
      else:
        ids.append(_str(rec[schema.id_key]))
      for c in schema.texts if texts else ():
        columns[c.attr].append(_text(rec, c))
  logging.info("indexed %s: %d records in %.1f s (cached; not repeated)", name, n, time.monotonic() - t0)
  meta = {
      "format": np.int64(FORMAT),
      "n": np.int64(n),
      "sizes": sizes,
      **{f"ids_{k}": v for k, v in pack_strings(ids).items()},
  }
  if schema.int_ids:
    meta[schema.int_ids] = int_ids
  if not texts:
    return meta, None
  text = {"format": np.int64(FORMAT), "n": np.int64(n)}
  for c in schema.texts:
    if c.many:
      text.update(_ragged(columns[c.attr], c.sidecar))
    else:
      text.update({f"{c.sidecar}_{k}": v for k, v in pack_strings(columns[c.attr]).items()})
  return meta, text


def _load(path: str, n: int) -> dict | None:
  """The sidecar's arrays, or None when it is missing or stale (record count differs)."""
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except Exception as e:
    raise ValueError(f"{path}: unreadable index sidecar ({type(e).__name__}: {e}); delete it to rebuild") from e
  found = data["format"].item() if "format" in data and data["format"].shape == () else None
  if found != FORMAT or "n" not in data:
    raise ValueError(f"{path}: index sidecar format {found}, this code reads format {FORMAT}; delete it to rebuild")
  if int(data["n"]) != n:
    logging.warning("%s holds %d records, the split has %d: rebuilding it", path, int(data["n"]), n)
    return None
  return data


def _save(path: str, arrays: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # atomic: processes that build it at the same time never see half a file


def sidecar_dir(data_dir: str, builder) -> str:
  config = builder.builder_config.name if builder.builder_config else "_"
  return os.path.join(data_dir, "pixelbert_index", builder.name, config, str(builder.version))


def load_index(source, *, schema: str, directory: str, split: str, name: str, texts: bool = False) -> SplitIndex:
  """The split's index from its sidecars, scanning the split (once) for whatever is missing."""
  spec = schemas.schema(schema)
  texts = texts and bool(spec.texts)  # a schema without texts (nlvr2) has no texts sidecar
  n = len(source)
  meta_path = os.path.join(directory, f"{split}.meta.npz")
  text_path = os.path.join(directory, f"{split}.texts.npz")
  meta, text = _load(meta_path, n), (_load(text_path, n) if texts else None)
  if meta is None or (texts and text is None):
    meta_new, text_new = _scan(source, spec, name, texts)
    if meta is None:
      _save(meta_path, meta_new)
      meta = meta_new
    if text_new is not None:
      _save(text_path, text_new)
      text = text_new
  index = SplitIndex(schema=schema, sizes=meta["sizes"], ids=unpack_strings(meta["ids_blob"], meta["ids_offsets"]))
  if spec.int_ids:
    setattr(index, spec.int_ids, meta[spec.int_ids])
  for c in spec.texts if text is not None else ():
    column = (
        _unragged(text, c.sidecar)
        if c.many
        else unpack_strings(text[f"{c.sidecar}_blob"], text[f"{c.sidecar}_offsets"])
    )
    setattr(index, c.attr, column)
  return index
