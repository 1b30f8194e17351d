"""`config.profile_steps`: a `jax.profiler` trace of a few training steps, and what took their time.

With `profile_steps` > 0, steps `profile_start_step` .. `profile_start_step + profile_steps - 1` (the run's own
step numbers, as the log and metrics.jsonl count them) are traced into WORKDIR/profile/plugins/profile/<time>/
as `<host>.xplane.pb`, one file per process: TensorBoard's profile plugin (xprof) opens that folder. Each step
is a `StepTraceAnnotation`, so the plugin's overview splits the time by step. XLA's operations and JAX's
host-side events are traced, Python function calls not (`StepProfiler.before` says why). Step 1 compiles the
step function: start later to trace steady steps. A run resumed past the start traces nothing.

  python -m pixelbert_jax.profiling WORKDIR [--top 15]

prints the XLA operations of the newest trace by their total time, read with jax.profiler's own xplane
reader (no TensorBoard needed).
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import sys
from typing import Any, Sequence

import jax
from etils import epath

from pixelbert_jax import cli_errors, paths

FOLDER = "profile"  # under the workdir: `tensorboard --logdir WORKDIR/profile`


class StepProfiler:
  """The training loop's hook: `before(step)` ahead of step `step` (fetching its batch included),
  `after(step, state)` once it is dispatched (the last traced step: once it has run), `close()` at the end of
  the loop (a run that stops inside the window still writes the steps it traced)."""

  def __init__(self, config: Any, workdir: epath.Path, first_step: int):
    steps = int(config.get("profile_steps", 0))
    self.first = int(config.get("profile_start_step", 1))
    self.last = self.first + steps - 1
    self.directory = workdir / FOLDER
    self._on = steps > 0 and first_step <= self.first
    self._tracing = False
    self._annotation: jax.profiler.StepTraceAnnotation | None = None
    if steps > 0 and not self._on:
      logging.info(
          "config.profile_start_step=%d is before this run's first step %d: no profile", self.first, first_step
      )

  def before(self, step: int) -> None:
    if not self._on or not self.first <= step <= self.last:
      return
    if not self._tracing:
      self.directory.mkdir(parents=True, exist_ok=True)
      options = jax.profiler.ProfileOptions()
      # JAX traces every Python call by default: about 190,000 per demo step (mostly the input pipeline's
      # decoding), 9 in 10 of the trace's events and 2.5x its size, each call slowed down to be recorded.
      options.python_tracer_level = 0
      jax.profiler.start_trace(str(self.directory), profiler_options=options)
      self._tracing = True
    # A step's annotation runs to the next step's start: its metrics, log line and checkpoint save included.
    self._end_step()
    self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
    self._annotation.__enter__()

  def after(self, step: int, state: Any) -> None:
    if self._tracing and step >= self.last:
      jax.block_until_ready(state)  # the device's work of the last step belongs in the trace
      self._end_step()
      self._stop(step)

  def close(self) -> None:
    if self._tracing:
      self._end_step()
      self._stop(None)

  def _end_step(self) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None

  def _stop(self, step: int | None) -> None:
    jax.profiler.stop_trace()
    self._tracing, self._on = False, False
    steps = f"steps {self.first}-{step}" if step is not None else f"the steps from {self.first} (the run stopped)"
    logging.info(
        "Profile of %s written to %s: `tensorboard --logdir %s` (with tensorboard-plugin-profile), or "
        "`python -m pixelbert_jax.profiling %s` for the top operations",
        steps,
        self.directory,
        self.directory,
        self.directory.parent,
    )


def trace_files(workdir: str | epath.Path) -> list[epath.Path]:
  """The `*.xplane.pb` files of the newest trace in WORKDIR/profile, or under a folder of that layout given
  itself (profile/, plugins/profile/ or one trace's folder)."""
  root = epath.Path(workdir)
  if (root / FOLDER).is_dir():
    root = root / FOLDER
  # The layout jax.profiler writes, at each depth (epath's glob has no recursive `**`, for object stores).
  layout = ("plugins/profile/*/*.xplane.pb", "profile/*/*.xplane.pb", "*/*.xplane.pb", "*.xplane.pb")
  files = sorted(next((found for found in (list(root.glob(p)) for p in layout) if found), []))
  newest = max((f.parent.name for f in files), default=None)
  return [f for f in files if f.parent.name == newest]


def _events(path: str | epath.Path):
  data = jax.profiler.ProfileData.from_serialized_xspace(epath.Path(path).read_bytes())
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        yield event, dict(event.stats)


def op_times(path: str | epath.Path) -> dict[str, float]:
  """Seconds per XLA operation (its HLO name, e.g. `fusion.12`, `convolution.3`) in one xplane file, summed
  over its calls and over the devices' threads."""
  total: dict[str, float] = collections.defaultdict(float)
  for event, stats in _events(path):
    if "hlo_op" in stats:
      total[str(stats["hlo_op"])] += event.duration_ns * 1e-9
  return dict(total)


def step_times(path: str | epath.Path) -> dict[int, float]:
  """Wall-clock seconds of each traced step: its StepTraceAnnotation, from the start of the loop's iteration to
  the next one's (the last: until its device work ended)."""
  return {
      int(stats["step_num"]): event.duration_ns * 1e-9
      for event, stats in _events(path)
      if event.name == "train" and "step_num" in stats
  }


def kind(op: str) -> str:
  """An operation's kind: its HLO name without the instance number (`fusion.12` -> `fusion`)."""
  return re.sub(r"\.\d+$", "", op)


def top_ops(workdir: str | epath.Path, top: int = 15) -> dict[str, Any]:
  """The newest trace's XLA operations by total time (`top`: [{op, seconds, share}]) and the same summed by
  kind (`by_kind`), shares of all operations' time (the devices' threads added up), and each traced step's
  wall-clock seconds (`steps`, from the first host's file)."""
  files = trace_files(workdir)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {workdir} (train with --config.profile_steps=N)")
  total: dict[str, float] = collections.Counter()
  for f in files:
    total.update(op_times(f))
  kinds: dict[str, float] = collections.Counter()
  for op, s in total.items():
    kinds[kind(op)] += s
  seconds = sum(total.values())

  def ranked(times: dict[str, float], key: str) -> list[dict[str, Any]]:
    best = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return [{key: name, "seconds": s, "share": s / seconds if seconds else 0.0} for name, s in best]

  return {
      "trace": [str(f) for f in files],
      "steps": {str(k): v for k, v in sorted(step_times(files[0]).items())},
      "op_seconds": seconds,
      "top": ranked(total, "op"),
      "by_kind": ranked(kinds, "kind"),
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixelbert_jax.profiling", description=__doc__.split("\n")[0])
  parser.add_argument("workdir", help="a training workdir (its profile/ folder), or a trace folder")
  parser.add_argument("--top", type=int, default=15, help="how many operations to list")
  parser.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  args = parser.parse_args(argv)
  return cli_errors.run_command(
      lambda: top_ops(paths.resolve(args.workdir), args.top), usage_errors=(FileNotFoundError,), verbose=args.verbose
  )


if __name__ == "__main__":
  sys.exit(main())
