"""Reading the files a user downloads: JSON (whole, as lines, or streamed element by element) and the
fields of each record, checked. Every mistake is a `RecordError` whose one-line message names the file, the
record (line, index or id) and the key, and what was expected instead.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from typing import Any, Iterable, Iterator


class RecordError(ValueError):
  """A record the builder does not understand; the message names the file, the record and the key."""


def _type_names(types: type | tuple[type, ...]) -> str:
  types = types if isinstance(types, tuple) else (types,)
  return " or ".join(t.__name__ for t in types)


def field(record: Any, key: str, types: type | tuple[type, ...], *, file: str, where: str, default: Any = ...) -> Any:
  """record[key], checked to be an instance of `types`; RecordError naming file/record/key otherwise.

  `default` (when given) is returned for a missing key or a JSON null. bool is never accepted as int.
  """
  if not isinstance(record, dict):
    raise RecordError(f"{file}: record {where}: expected a JSON object, got {type(record).__name__}")
  if key not in record or (record[key] is None and default is not ...):
    if default is not ...:
      return default
    raise RecordError(f"{file}: record {where}: missing key {key!r} (keys present: {sorted(record)})")
  value = record[key]
  wanted = types if isinstance(types, tuple) else (types,)
  if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
    raise RecordError(
        f"{file}: record {where}: key {key!r} must be {_type_names(types)}, "
        f"got {type(value).__name__} {_short(value)}"
    )
  return value


def str_list(record: Any, key: str, *, file: str, where: str, default: Any = ...) -> list[str]:
  values = field(record, key, list, file=file, where=where, default=default)
  for i, v in enumerate(values):
    if not isinstance(v, str):
      raise RecordError(f"{file}: record {where}: key {key!r}[{i}] must be str, " f"got {type(v).__name__} {_short(v)}")
  return values


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def not_utf8(path: str, data: bytes, e: UnicodeDecodeError, *, line: int | None = None, offset: int = 0) -> RecordError:
  """'FILE: line N: not valid UTF-8 ...' for a decode error at e.start of `data` (bytes `offset`.. of the
  file); the line is counted from `data` unless the caller knows it."""
  if line is None:
    line = data.count(b"\n", 0, e.start) + 1
  return RecordError(
      f"{path}: line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {offset + e.start} of the "
      f"file: {e.reason}); save the file as UTF-8"
  )


def load_json(path: str) -> Any:
  """Whole-file JSON, with the file named in the error (json's own errors only give line/column)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data)
  except UnicodeDecodeError as e:  # json.loads decodes bytes as UTF-8 (or UTF-16/32 after a BOM)
    raise not_utf8(path, data, e) from None
  except json.JSONDecodeError as e:
    raise RecordError(f"{path}: not valid JSON ({e})") from e


def iter_json_lines(path: str) -> Iterator[tuple[int, dict]]:
  """(1-based line number, object) for each non-blank line of a JSON-lines file."""
  offset = 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise not_utf8(path, raw, e, line=line_no, offset=offset) from None
      offset += len(raw)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError(f"{path}: line {line_no}: not valid JSON ({e})") from e
      if not isinstance(record, dict):
        raise RecordError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}")
      yield line_no, record


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = re.compile(r"[0-9eE.+-]*")
_JSON_CHUNK = 1 << 20  # characters read at a time


def iter_json_array(path: str, *, chunk: int = _JSON_CHUNK) -> Iterator[tuple[int, Any]]:
  """(index, element) for each element of a file whose top level is a JSON list, read `chunk` characters at
  a time: memory holds one element and one chunk, not the file (json.load of Visual Genome's 700 MB
  region_descriptions.json peaks at several GB). Invalid JSON is a RecordError naming the file, the
  element and the character offset.
  """
  decoder = json.JSONDecoder()
  with open(path, "rb") as f:
    buf, pos, offset, eof = "", 0, 0, False  # offset: characters of the file before buf
    pending, done_bytes, done_lines = b"", 0, 0  # undecoded bytes (a cut character); bytes, lines decoded

    def fill() -> None:
      nonlocal buf, pos, offset, eof, pending, done_bytes, done_lines
      raw = f.read(chunk)
      data = pending + raw
      try:
        more, used = codecs.utf_8_decode(data, "strict", not raw)
      except UnicodeDecodeError as e:
        raise not_utf8(path, data, e, line=done_lines + data.count(b"\n", 0, e.start) + 1, offset=done_bytes) from None
      pending, done_bytes, done_lines = data[used:], done_bytes + used, done_lines + data.count(b"\n", 0, used)
      eof = not raw
      buf, offset, pos = buf[pos:] + more, offset + pos, 0

    def skip_space() -> str:
      # The next non-whitespace character ('' at the end of the file), reading on as needed.
      nonlocal pos
      while True:
        pos = _WHITESPACE.match(buf, pos).end()
        if pos < len(buf) or eof:
          return buf[pos] if pos < len(buf) else ""
        fill()

    def bad(what: str) -> RecordError:
      return RecordError(f"{path}: not valid JSON at character {offset + pos}: {what}")

    first = skip_space()
    if first != "[":
      got = {"{": "an object", "": "an empty file"}.get(first, f"{first!r}")
      raise RecordError(f"{path}: expected a top-level list, got {got}")
    pos += 1
    index = 0
    if skip_space() == "]":
      pos += 1
    else:
      while True:
        skip_space()
        while True:
          try:
            value, end = decoder.raw_decode(buf, pos)
          except json.JSONDecodeError as e:
            if eof:
              raise RecordError(
                  f"{path}: not valid JSON in element [{index}] at character {offset + e.pos}: {e.msg}"
              ) from e
            fill()  # the element may continue in the next chunk
            continue
          cut_number = isinstance(value, (int, float)) and _NUMBER_CHARS.fullmatch(buf, end)
          if not eof and (end == len(buf) or cut_number):  # "12" of "12.5" decodes too: read on
            fill()
            continue
          break
        pos = end
        yield index, value
        index += 1
        sep = skip_space()
        pos += 1
        if sep == "]":
          break
        if sep != ",":
          pos -= 1
          raise bad(f"expected ',' or ']' after element [{index - 1}], got {sep or 'the end of the file'!r}")
    if skip_space():
      raise bad("extra data after the top-level list")


def top_level(data: Any, key: str, *, file: str) -> list:
  """data[key] of a JSON file whose top level must be an object holding a list under `key`."""
  if not isinstance(data, dict) or key not in data:
    got = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
    raise RecordError(f"{file}: expected a top-level object with key {key!r}, got {got}")
  if not isinstance(data[key], list):
    raise RecordError(f"{file}: key {key!r} must be a list, got {type(data[key]).__name__}")
  return data[key]


def check_unique(seen: set, key: Any, *, file: str, where: str, what: str) -> None:
  if key in seen:
    raise RecordError(f"{file}: record {where}: duplicate {what} {key!r}")
  seen.add(key)


def require_file(path: str, *, hint: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found. {hint}")
  return path


def first_existing_dir(candidates: Iterable[str], *, what: str, hint: str) -> str:
  candidates = list(candidates)
  for d in candidates:
    if os.path.isdir(d):
      return d
  raise FileNotFoundError(f"no {what} folder found; looked for {candidates}. {hint}")
