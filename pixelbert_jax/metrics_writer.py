"""Where metrics go: `metrics.jsonl` (one JSON object per logged step), TensorBoard, and the console.

Only process 0 writes; the other processes get a writer that does nothing, so callers need no branches.
tensorboardX rather than clu: clu's writers pull in TensorFlow.

A resumed run passes `resume_step`: the rows a killed or preempted run wrote after that checkpoint are
dropped (they are written again), so no step appears twice; TensorBoard purges its events after that step
the same way. Each row goes to TensorBoard first and to `metrics.jsonl` last, so a row in `metrics.jsonl`
means TensorBoard has it too: train.py reruns a resumed step's evaluation when its row is missing
(`has_row`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Mapping

import jax
from etils import epath


class MetricWriter:

  def __init__(self, workdir: str | epath.Path, *, enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._rows_dropped = 0
    self._keys: dict[int, set[str]] = {}  # step -> keys of its rows, read at resume or written since
    if not self.enabled:
      return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / "metrics.jsonl"
    # Object stores (gs://) cannot append: there the file is rewritten whole at each write.
    self._rewrite = "://" in str(workdir)
    reads = self._rewrite or resume_step is not None
    self._rows: list[str] = self._path.read_text().splitlines() if reads and self._path.exists() else []
    if resume_step is not None:
      self._drop_rows_after(resume_step)
    if not self._rewrite:
      self._rows = []  # appended to the file from here on; only object stores keep them to rewrite
    self._jsonl = None if self._rewrite else self._path.open("a")
    try:
      from tensorboardX import SummaryWriter

      # Always on resume: a run killed between TensorBoard and metrics.jsonl left events with no row.
      purge = {"purge_step": resume_step + 1 if resume_step > 0 else 0} if resume_step is not None else {}
      # The suffix: tensorboardX names a file by the second and opens it with "wb", so a writer started in
      # the same second as the previous one erased its events.
      self._tb = _synchronous(
          SummaryWriter(str(workdir / "tensorboard"), filename_suffix=f".{time.time_ns()}"), **purge
      )
    except ImportError:  # tensorboardX is an install requirement; a stripped environment still logs JSONL.
      logging.warning("tensorboardX is not installed: no TensorBoard events will be written")

  def _drop_rows_after(self, step: int) -> None:
    """Keeps the rows up to `step` (none for a run that starts at 0: the rows belong to a run that saved
    nothing) and drops unreadable ones (a line cut by kill -9 while being written)."""
    kept = []
    for line in self._rows:
      try:
        row_step = int(json.loads(line)["step"])
      except (ValueError, KeyError, TypeError):
        continue
      if 0 < step and row_step <= step:
        kept.append(line)
        self._keys.setdefault(row_step, set()).update(json.loads(line))
    self._rows_dropped = len(self._rows) - len(kept)
    if self._rows_dropped:
      where = f"after step {step}, where this run resumes" if step else "by a run that saved no checkpoint"
      logging.warning("%s: dropped %d rows written %s (they are written again)", self._path, self._rows_dropped, where)
      text = "".join(row + "\n" for row in kept)
      if self._rewrite:
        self._path.write_text(text)
      else:  # whole or not at all: a kill now leaves the old file
        tmp = self._path.with_name(self._path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(self._path)
    self._rows = kept

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    row = json.dumps({"step": int(step), **clean})
    if self._tb is not None:
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    if self._rewrite:
      self._rows.append(row)
      self._path.write_text("\n".join(self._rows) + "\n")
    else:
      self._jsonl.write(row + "\n")
      self._jsonl.flush()
    self._keys.setdefault(int(step), set()).update(clean)

  def has_row(self, step: int, prefix: str) -> bool:
    """Whether a readable row at `step` has a key starting with `prefix`, among the rows kept at resume and
    those written since (False on a writer that is not enabled)."""
    return any(k.startswith(prefix) for k in self._keys.get(int(step), ()))

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def has_row(workdir: str | epath.Path, step: int, prefix: str) -> bool:
  """MetricWriter.has_row without a writer (which would drop and purge): reads `metrics.jsonl` as it is."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if jax.process_index() != 0 or not path.exists():
    return False
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
      if int(row["step"]) == int(step) and any(k.startswith(prefix) for k in row):
        return True
    except (ValueError, KeyError, TypeError):
      continue
  return False


def _synchronous(writer, purge_step: int | None = None):
  """tensorboardX's `add_scalar` only queues an event for a writer thread, and its `flush()` does not wait
  for that thread: a kill -9 right after a row reached metrics.jsonl lost the row's TensorBoard events
  whenever the thread lagged (a loaded machine). Each event is written to the file at once instead, so
  `flush()` makes a row durable before metrics.jsonl gets it. The purge marker (what `purge_step=` writes)
  goes first, in the same order tensorboardX gives it. A tensorboardX without these internals keeps its
  queue, with a warning."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog

  events = writer._get_file_writer().event_writer  # noqa: SLF001 - the one way to make its writes synchronous
  file = getattr(events, "_ev_writer", None)
  if file is None or not hasattr(file, "write_event"):
    logging.warning("this tensorboardX has no synchronous event file: a kill -9 may lose the last rows' events")
    return writer
  events.add_event = file.write_event
  if purge_step is not None:
    events.add_event(Event(step=purge_step, file_version="brain.Event:2"))
    events.add_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
  return writer


class ProgressLine:
  """The console line a person follows: step, losses, accuracies, learning rate, throughput, ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._t0 = time.monotonic()
    self._s0 = start_step

  def format(self, step: int, m: Mapping[str, float]) -> str:
    elapsed = time.monotonic() - self._t0
    done = max(step - self._s0, 1)
    eta = elapsed / done * max(self.total_steps - step, 0)
    parts = [f"step {step}/{self.total_steps}"]
    for key, fmt in (
        ("train/loss", "loss {:.4f}"),
        ("train/mlm_acc", "mlm_acc {:.3f}"),
        ("train/itm_acc", "itm_acc {:.3f}"),
        ("train/lr", "lr {:.2e}"),
        ("perf/examples_per_s", "{:.1f} ex/s"),
    ):
      if key in m:
        parts.append(fmt.format(m[key]))
    parts.append(f"ETA {_hms(eta)}")
    return " | ".join(parts)


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
