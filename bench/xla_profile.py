"""`--profile DIR`: trace a few calls of a compiled JAX program and list its most expensive XLA ops."""

import json
import os


def profile_jax(fn, args, trace_dir, *, steps=3, top=25):
  """Trace `steps` calls of the compiled `fn(*args)` -> fn's result and the `top` XLA ops by time per
  call, each with its output shape and the JAX op it came from (from the compiled HLO's metadata).

  The trace (TensorBoard / Perfetto, `*.trace.json.gz`) stays in trace_dir. Times are summed over
  threads, so on a CPU they can exceed the wall time of the call. On a GPU only kernels that the trace
  ties to an HLO op (args.hlo_op, or named after one) are counted; open the trace for the rest."""
  import collections
  import glob
  import gzip
  import re

  import jax

  hlo = fn.as_text()
  os.makedirs(trace_dir, exist_ok=True)
  jax.block_until_ready(args)  # calls still in flight (async dispatch) would land in the trace
  out = None
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      out = fn(*args)
      args = (out[0],) + tuple(args[1:]) if isinstance(out, tuple) else args  # donated state
      jax.block_until_ready(out)
  traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not traces:
    raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)["traceEvents"]
  # On a GPU the kernels carry their HLO op in args.hlo_op (host-side launch events would count twice);
  # on the CPU the op events are named after the HLO instruction.
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  device = [e for e in complete if e.get("args", {}).get("hlo_op")]
  per_op = collections.Counter()
  for e in device or complete:
    name = e["args"]["hlo_op"] if device else e.get("name", "")
    if name in hlo and not name.startswith(("$", "Thunk", "Pjit")):
      per_op[name] += e["dur"] / 1e3 / steps

  def describe(name):
    m = re.search(r"^\s*(?:ROOT )?%" + re.escape(name) + r" = (\S+) .*$", hlo, re.M)
    if not m:
      return "?", ""
    shape, line = m.group(1), m.group(0)
    op = re.search(r'op_name="([^"]+)"', line)
    called = re.search(r"calls=%([\w.\-]+)", line)
    if not op and called:  # a fusion: the last op named inside its computation
      body = re.search(r"^%" + re.escape(called.group(1)) + r" .*?^\}", hlo, re.M | re.S)
      ops = re.findall(r'op_name="([^"]+)"', body.group(0)) if body else []
      return shape, ops[-1] if ops else ""
    return shape, op.group(1) if op else ""

  rows = [(name, ms, *describe(name)) for name, ms in per_op.most_common(top)]
  return out, dict(trace=traces[-1], total_ms=sum(per_op.values()), top=rows)


def print_profile(prof):
  if not prof["top"]:
    print(f"\nprofile: {prof['trace']}: no event named after an XLA op of the program")
    return
  print(
      f"\nprofile: {prof['trace']}\nXLA ops, ms per call summed over threads " f"(all ops: {prof['total_ms']:.1f} ms):"
  )
  for name, ms, shape, op in prof["top"]:
    print(f"{ms:8.2f}  {name[:34]:34s} {shape[:44]:44s} {op[-90:]}")
