"""BatchIterator: this process's rows of the global plan, decoded by grain (optionally in workers), batched.

Slot s of the row stream is row s % B of this process's part of global batch s // B, so B consecutive
rows always form one batch of one bucket, and the iterator state is grain's position plus the bad-record
tally: a small JSON dict, taken at batch boundaries. A bad record becomes a padding row (example_mask=0)
of the same bucket, so shapes stay what the plan says on every process.
"""

from __future__ import annotations

import logging

import grain
import ml_collections
import numpy as np
from absl import flags

from pixelbert_jax.data.examples import record_buckets
from pixelbert_jax.data.plan import GlobalPlan
from pixelbert_jax.data.sources import OpenSplit

_MIN_SEEN_FOR_BAD_CHECK = 200
_SHOW_BAD = 5
_ENDLESS = 1 << 62


class PlannedRows:
  """Callable slot -> example of this process's planned row (picklable for grain workers)."""

  def __init__(self, plan: GlobalPlan, examples, *, batch_size: int, process_index: int, process_count: int):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    self.plan, self.examples, self.B = plan, examples, int(batch_size)
    self.p, self.P = int(process_index), int(process_count)

  def __call__(self, slot: int) -> dict:
    step, row = divmod(int(slot), self.B)
    bucket, records, positions = self.plan.rows(step, self.p, self.P)
    element = self.examples(int(records[row]), int(positions[row]), bucket)
    element["_bucket"] = bucket
    return element


class BatchIterator:
  """Iterator of batches (dict[str, np.ndarray]) with get_state() / set_state(state)."""

  def __init__(
      self,
      rows: PlannedRows,
      *,
      train: bool,
      max_bad_fraction: float,
      num_workers: int,
      prefetch: int,
      read_threads: int = 16,
      read_buffer: int = 500,
  ):
    self._rows, self._B, self._train = rows, rows.B, train
    self._max_bad_fraction = float(max_bad_fraction)
    n = rows.plan.num_batches()
    self.num_batches = n  # None when infinite (train)
    # grain's reader threads (defaults 16 and 500 elements): on a 2-core machine fewer threads and a smaller
    # buffer halve the CPU time per batch, because grain polls every buffered element on each read.
    ds = (
        grain.MapDataset.range(_ENDLESS if n is None else n * self._B)
        .map(rows)
        .to_iter_dataset(grain.ReadOptions(num_threads=int(read_threads), prefetch_buffer_size=int(read_buffer)))
    )
    if num_workers > 0:
      if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside an absl app use defaults
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch))
    self._it = iter(ds)
    self._seen = self._bad = 0
    self._bad_messages: list[str] = []

  def __iter__(self):
    return self

  def _check_bad(self, final: bool) -> None:
    if (
        self._bad
        and (final or self._seen >= _MIN_SEEN_FOR_BAD_CHECK)
        and self._bad > self._max_bad_fraction * self._seen
    ):
      raise RuntimeError(
          f"{self._bad} of {self._seen} records were bad (max_bad_fraction="
          f"{self._max_bad_fraction}); first ones: " + "; ".join(self._bad_messages)
      )

  def _count(self, element: dict) -> dict:
    if element.get("_bad"):
      self._seen += 1
      self._bad += 1
      if len(self._bad_messages) < _SHOW_BAD:
        self._bad_messages.append(element["_bad"])
      logging.warning("skipping bad record (%d so far): %s", self._bad, element["_bad"])
      self._check_bad(final=False)
      return self._rows.examples.padding(element["_bucket"], element["_pos"])
    if element["example_mask"] > 0:
      self._seen += 1
    return element

  def __next__(self) -> dict[str, np.ndarray]:
    elements = []
    for _ in range(self._B):
      try:
        elements.append(self._count(next(self._it)))
      except StopIteration:
        if elements:
          raise RuntimeError(f"row stream ended inside a batch after {len(elements)} of {self._B} rows")
        self._check_bad(final=True)
        raise
    return {k: np.stack([e[k] for e in elements]) for k in elements[0] if not k.startswith("_")}

  def get_state(self) -> dict:
    return {
        "grain": self._it.get_state(),
        "seen": self._seen,
        "bad": self._bad,
        "bad_messages": list(self._bad_messages),
    }

  def set_state(self, state: dict) -> None:
    self._it.set_state(state["grain"])
    self._seen, self._bad = int(state["seen"]), int(state["bad"])
    self._bad_messages = list(state["bad_messages"])


def planned_iterator(
    data_cfg: ml_collections.ConfigDict,
    opened: OpenSplit,
    examples,
    *,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    train: bool,
) -> BatchIterator:
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  plan = GlobalPlan(
      record_buckets(opened.index.sizes, data_cfg), global_batch=batch_size * process_count, seed=seed, train=train
  )
  rows = PlannedRows(plan, examples, batch_size=batch_size, process_index=process_index, process_count=process_count)
  return BatchIterator(
      rows,
      train=train,
      max_bad_fraction=data_cfg.max_bad_fraction,
      num_workers=data_cfg.num_workers,
      prefetch=data_cfg.prefetch,
      read_threads=data_cfg.get("read_threads", 16),
      read_buffer=data_cfg.get("read_buffer", 500),
  )
