"""The global data plan: which records form global batch t, identically on every process.

Every record's bucket is known before decoding (from stored height/width), so the plan is pure integer
arithmetic on the bucket of each record:
- train: epoch e visits the records in a permutation drawn from (seed, e); each record joins its bucket's
  queue; when a queue holds G = batch_size * process_count records they form the next global batch.
  Records left in a queue at the end of an epoch stay there and complete a batch early in the next epoch,
  so no record is ever dropped. A record's stream position (e * n + its rank in epoch e) seeds its
  per-example randomness: independent of the process count.
- eval: one pass in record order, the same queues; what is left at the end is flushed as padded batches
  (record PAD_RECORD) in bucket order, so every process sees the same number of batches and shapes.
Process p takes rows [p*B, (p+1)*B) of each global batch.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

PAD_RECORD = -1


class GlobalPlan:
  """Global batches over records whose bucket ids are `buckets` (int [n], values in [0, num_buckets))."""

  def __init__(self, buckets: np.ndarray, *, global_batch: int, seed: int, train: bool):
    self.buckets = np.asarray(buckets, np.int64)
    if self.buckets.ndim != 1 or len(self.buckets) == 0:
      raise ValueError(f"plan needs a non-empty 1-D array of bucket ids, got shape {self.buckets.shape}")
    if global_batch < 1:
      raise ValueError(f"global batch must be >= 1, got {global_batch}")
    self.n, self.G, self.seed, self.train = len(self.buckets), int(global_batch), int(seed), train
    self.num_buckets = int(self.buckets.max()) + 1
    counts = np.bincount(self.buckets, minlength=self.num_buckets)
    if train and counts.max() < self.G:
      raise ValueError(
          f"no bucket holds a global batch: bucket sizes {counts.tolist()} < {self.G} "
          f"(batch_size x process_count); use a smaller batch or fewer buckets"
      )
    # epoch e -> (first global step, carry at its start); filled in order as epochs are planned
    self._starts: list[tuple[int, list[tuple[np.ndarray, np.ndarray]]]] = [(0, self._empty_carry())]
    self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    self._eval: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    self._lock = threading.Lock()  # grain reads ahead from several threads; the memo must stay consistent

  def __getstate__(self):  # pickled into grain worker processes: a lock cannot travel
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _empty_carry(self):
    return [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(self.num_buckets)]

  def _chunks(self, order: np.ndarray, positions: np.ndarray, carry):
    """Queues fed in `order`: (bucket [k], records [k,G], positions [k,G]) in completion order, new carry."""
    bk = self.buckets[order]
    done, new_carry = [], []
    for b in range(self.num_buckets):
      ranks = np.flatnonzero(bk == b)
      recs = np.concatenate([carry[b][0], order[ranks]])
      poss = np.concatenate([carry[b][1], positions[ranks]])
      last = np.concatenate([np.full(len(carry[b][0]), -1, np.int64), ranks])
      k = len(recs) // self.G
      for j in range(k):
        sl = slice(j * self.G, (j + 1) * self.G)
        done.append((int(last[sl.stop - 1]), b, recs[sl], poss[sl]))
      new_carry.append((recs[k * self.G :], poss[k * self.G :]))
    done.sort(key=lambda d: d[0])
    if not done:
      return (np.zeros(0, np.int64), np.zeros((0, self.G), np.int64), np.zeros((0, self.G), np.int64)), new_carry
    return (
        np.array([d[1] for d in done], np.int64),
        np.stack([d[2] for d in done]),
        np.stack([d[3] for d in done]),
    ), new_carry

  def _epoch(self, e: int):
    while len(self._starts) <= e + 1:  # plan earlier epochs first: their carry feeds the next one
      k = len(self._starts) - 1
      start, carry = self._starts[k]
      batches, new_carry = self._plan_epoch(k, carry)
      self._starts.append((start + len(batches[0]), new_carry))
      self._remember(k, batches)
    if e not in self._cache:
      self._remember(e, self._plan_epoch(e, self._starts[e][1])[0])
    return self._cache[e]

  def _plan_epoch(self, e: int, carry):
    order = np.random.default_rng([self.seed, e]).permutation(self.n).astype(np.int64)
    return self._chunks(order, e * self.n + np.arange(self.n, dtype=np.int64), carry)

  def _remember(self, e: int, batches) -> None:
    self._cache.pop(e, None)
    self._cache[e] = batches  # most recently used last
    while len(self._cache) > 2:  # workers walk forward: two epochs of memo suffice
      del self._cache[next(iter(self._cache))]

  def _eval_batches(self):
    if self._eval is None:
      order = np.arange(self.n, dtype=np.int64)
      (bk, recs, poss), carry = self._chunks(order, order, self._empty_carry())
      tail_b, tail_r = [], []
      for b, (r, _) in enumerate(carry):
        if len(r):
          tail_b.append(b)
          tail_r.append(np.concatenate([r, np.full(self.G - len(r), PAD_RECORD, np.int64)]))
      if tail_b:
        bk = np.concatenate([bk, tail_b])
        recs = np.concatenate([recs.reshape(-1, self.G), np.stack(tail_r)])
      self._eval = (bk, recs, recs.copy())  # eval positions are record indices
    return self._eval

  def num_batches(self) -> int | None:
    """Global batches of one eval pass; None for train (infinite)."""
    return None if self.train else len(self._eval_batches()[0])

  def batch(self, step: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Global batch `step`: (bucket id, records int [G], stream positions int [G]); PAD_RECORD pads eval."""
    with self._lock:
      return self._batch(step)

  def _batch(self, step: int) -> tuple[int, np.ndarray, np.ndarray]:
    if step < 0:
      raise IndexError(f"step {step} < 0")
    if not self.train:
      bk, recs, poss = self._eval_batches()
      if step >= len(bk):
        raise IndexError(f"eval plan has {len(bk)} batches, asked for {step}")
      return int(bk[step]), recs[step], poss[step]
    e = self._epoch_of(step)
    bk, recs, poss = self._epoch(e)
    j = step - self._starts[e][0]
    return int(bk[j]), recs[j], poss[j]

  def _epoch_of(self, step: int) -> int:
    while self._starts[-1][0] <= step:  # the last known start is the start of an unplanned epoch
      self._epoch(len(self._starts) - 1)
    return bisect.bisect_right([s for s, _ in self._starts], step) - 1

  def rows(self, step: int, process_index: int, process_count: int) -> tuple[int, np.ndarray, np.ndarray]:
    """This process's rows [p*B, (p+1)*B) of global batch `step`."""
    b, recs, poss = self.batch(step)
    per = self.G // process_count
    sl = slice(process_index * per, (process_index + 1) * per)
    return b, recs[sl], poss[sl]
