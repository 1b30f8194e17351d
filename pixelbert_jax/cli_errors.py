"""How every command ends a failure: one `error: ...` line on stderr and exit status 1 (2: bad usage).

The traceback goes to WORKDIR/error.log where the command has a workdir (training), to stderr with
--verbose, and nowhere else: a person reads the line, a bug report attaches the log. A full disk is named as
such, with the path that could not be written and the space left there. Orbax logs every failed write of
a save from its own threads with a traceback; `QuietOrbax` shows the first lines only, one line each, and
keeps the full records for error.log.
"""

from __future__ import annotations

import collections
import errno
import io
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
from typing import Any, Callable

INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C


def first_line(e: BaseException | str, *, with_type: bool = False) -> str:
  """The first non-blank line of an exception's message (or of a text), stripped: the part of a long message
  (a traceback quoted by XLA, a list of mismatches) that fits an `error:` line. '' when there is none;
  `with_type`: prefixed by the exception's type, e.g. 'OSError: ...' (its type alone when the message is empty)."""
  text = next((s.strip() for s in str(e).splitlines() if s.strip()), "")
  if with_type and isinstance(e, BaseException):
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def disk_full(e: BaseException) -> BaseException | None:
  """The ENOSPC error in `e`'s chain (Orbax and tensorstore wrap it, or only quote it), or None."""
  for x in _chain(e):
    if (isinstance(x, OSError) and x.errno == errno.ENOSPC) or "No space left on device" in str(x):
      return x
  return None


def _bytes(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} bytes"


def free_space(path: str) -> str:
  """'1.2 GiB free in /mnt' for the file system holding `path` (its nearest existing parent)."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  try:
    free = shutil.disk_usage(probe).free
  except OSError:
    return "free space unknown"
  return f"{_bytes(free)} free in {probe}"


def _written_file(causes: list[BaseException]) -> str | None:
  """The file whose write failed, from the ENOSPC errors in a chain: an OSError's filename, else an absolute
  path quoted in a message (tensorstore quotes the file it wrote), else a path-like local of the innermost
  frame that has one, in an OSError that `f.write(...)` raised without a filename (the frame holds the path)."""
  for x in causes:
    if getattr(x, "filename", None):
      return os.fspath(x.filename)
  for x in causes:
    quoted = re.search(r"""['"](/[^'"]+)['"]""", str(x))
    if quoted:
      return quoted.group(1)
  for x in causes:
    if not isinstance(x, OSError):
      continue
    frames, tb = [], x.__traceback__
    while tb is not None:
      frames.append(tb.tb_frame)
      tb = tb.tb_next
    for frame in reversed(frames):
      for value in frame.f_locals.values():
        path = os.fspath(value) if isinstance(value, os.PathLike) else None
        if isinstance(path, str) and os.path.isabs(path):
          return path
  return None


def _newest_checkpoint(workdir: str) -> str | None:
  folder = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return os.path.join(folder, str(max(steps))) if steps else None


def message(e: BaseException, where: str | None = None) -> str:
  """One line for `e`: a full disk by path and free space; our errors as written; others with their type."""
  full = disk_full(e)
  if full is not None:
    chain = list(_chain(e))
    # checkpoint.CheckpointSaveError: the step folder being saved, and the free space when the save failed.
    saving = next((x for x in chain if hasattr(x, "step_dir")), None)
    causes = [x for x in chain if x is not saving and disk_full(x) is x]
    path = _written_file(causes)
    if not path:
      path = str(saving.step_dir) if saving is not None else (where or "?")
    free = free_space(str(path))  # now: after close() removed the unfinished step folder
    if saving is not None and saving.free_bytes is not None and " free in " in free:
      after, probe = free.split(" free in ", 1)
      free = f"{_bytes(saving.free_bytes)} free in {probe} when the write failed"
      free += f", {after} after removing the unfinished step"
    newest = _newest_checkpoint(where) if where else None
    kept = f"; {newest} is the newest complete checkpoint: free space and rerun to resume" if newest else ""
    return f"disk full: could not write {path} (No space left on device; {free}){kept}"
  text = first_line(e)
  if isinstance(e, (ValueError, OSError, FloatingPointError)) or type(e).__module__.startswith("pixelbert_jax"):
    return text or type(e).__name__
  return first_line(e, with_type=True)


def details(e: BaseException, limit: int = 20) -> list[str]:
  """The indented lines after a message's first (a checkpoint mismatch lists every parameter)."""
  if disk_full(e) is not None:
    return []
  lines = [s for s in str(e).splitlines()[1:] if s.strip()]
  return [s if s.startswith(" ") else "  " + s for s in lines[:limit]]


def report(
    e: BaseException,
    *,
    verbose: bool = False,
    workdir: str | None = None,
    quiet_orbax: "QuietOrbax | None" = None,
    code: int = 1,
    log_name: str = "error.log",
) -> int:
  """Prints the `error:` line(s) for `e` (one per config problem), writes the traceback to WORKDIR/error.log
  when `workdir` is a folder, and returns `code`."""
  trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
  log = None
  if workdir and "://" not in str(workdir) and os.path.isdir(workdir):
    log = os.path.join(workdir, log_name)
    try:
      with open(log, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S %z')}: {' '.join(sys.argv)}\n")
        if quiet_orbax is not None and quiet_orbax.kept:
          f.write("".join(r + "\n" for r in quiet_orbax.kept))
        f.write(trace)
    except OSError:  # a full disk, or a workdir we cannot write: the line below still says what failed
      log = None
  if verbose:
    sys.stderr.write(trace)
  problems = getattr(e, "problems", None)
  lines = [f"error: {p}" for p in problems] if problems else [f"error: {message(e, where=workdir)}"] + details(e)
  unexpected = (
      not problems
      and not isinstance(e, (ValueError, OSError, FloatingPointError))
      and not type(e).__module__.startswith("pixelbert_jax")
  )
  if unexpected and log and not verbose:
    lines[0] += f" (traceback in {log})"
  sys.stderr.flush()
  print("\n".join(lines), file=sys.stderr, flush=True)
  return code


def run_command(body: Callable[[], Any], *, usage_errors: tuple[type[BaseException], ...], verbose: bool) -> int:
  """A tool's `main`: runs `body` and prints its result as JSON (unless None). A `usage_errors` exception
  (bad input the user can fix) is its first line as `error: ...` and exit status 2; Ctrl-C and anything
  else are reported as `interrupted` and `report` do."""
  try:
    result = body()
  except usage_errors as e:
    print(f"error: {first_line(e) or type(e).__name__}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return interrupted()
  except Exception as e:  # noqa: BLE001 - anything else is one line too; --verbose shows where
    return report(e, verbose=verbose)
  if result is not None:
    print(json.dumps(result, indent=2))
  return 0


def interrupted() -> int:
  print(
      "error: interrupted: stopped without saving; rerun to resume from the newest checkpoint",
      file=sys.stderr,
      flush=True,
  )
  return INTERRUPTED


class QuietOrbax(logging.Filter):
  """For the console handler: Orbax's INFO records dropped (it logs every file it writes), its warnings and
  errors cut to their first line without traceback, and after `show` of them the rest only counted.
  The full text of those records is kept (the newest `keep`) for error.log."""

  def __init__(self, show: int = 3, keep: int = 200):
    super().__init__()
    self.show, self.shown, self.hidden = show, 0, 0
    self.kept: collections.deque[str] = collections.deque(maxlen=keep)
    self._formatter = logging.Formatter("%(levelname)s %(pathname)s:%(lineno)d %(message)s")

  def filter(self, record: logging.LogRecord) -> bool:
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    self.kept.append(self._formatter.format(record))
    if self.shown >= self.show:
      self.hidden += 1
      if self.hidden == 1:
        record.msg, record.args = "(further Orbax errors are not shown here; see error.log)", None
        record.exc_info = record.exc_text = record.stack_info = None
        return True
      return False
    self.shown += 1
    first = first_line(record.getMessage())
    record.msg, record.args = (first[:300] + (" ..." if len(first) > 300 else "")), None
    record.exc_info = record.exc_text = record.stack_info = None
    return True


class CollapsedTracebacks(io.TextIOBase):
  """sys.stderr for a run without --verbose: every traceback printed to it, by code we do not control, becomes
  one warning line, shown once per distinct exception line; the full text is kept for error.log. After a
  failed Orbax save, tensorstore's completion callbacks into the save's closed event loop print one
  traceback per array (thousands of lines) straight to sys.stderr, past every hook and logging filter.
  Log records and our own lines pass through unchanged."""

  _CHAIN = ("During handling of the above exception", "The above exception was the direct cause")

  def __init__(self, stream, quiet: QuietOrbax):
    super().__init__()
    self._stream, self._quiet, self._seen = stream, quiet, set()
    # Per thread: several threads print their tracebacks at once, a few lines per write each.
    self._state, self._lock = threading.local(), threading.Lock()

  def write(self, text: str) -> int:
    state = self._state
    state.pending = getattr(state, "pending", "") + text
    while "\n" in state.pending:
      line, state.pending = state.pending.split("\n", 1)
      self._line(state, line)
    return len(text)

  def _line(self, state, line: str) -> None:
    block = getattr(state, "block", None)
    if block is not None:
      block.append(line)
      if line and not line[0].isspace() and not line.startswith(("Traceback", *self._CHAIN)):
        state.block = None
        with self._lock:
          self._quiet.kept.append("\n".join(block))
          if line not in self._seen:
            self._seen.add(line)
            self._stream.write(f"warning: a background task raised {line[:300]} (repeats not shown)\n")
      return
    if line.startswith("Traceback (most recent call last):"):
      state.block = [line]
      return
    with self._lock:
      self._stream.write(line + "\n")

  def flush(self) -> None:
    state = self._state
    with self._lock:
      if getattr(state, "pending", "") and getattr(state, "block", None) is None:
        self._stream.write(state.pending)
        state.pending = ""
      self._stream.flush()

  def fileno(self) -> int:
    return self._stream.fileno()

  def isatty(self) -> bool:
    return self._stream.isatty()

  def writable(self) -> bool:
    return True


def exit_now(code: int) -> None:
  """Ends the process after a reported failure without the interpreter's shutdown: the background
  threads of a failed checkpoint save (Orbax, tensorstore) would print hundreds of lines of tracebacks
  there about their closed event loop, burying the one line that matters."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(code)
