"""The benchmarks' markdown tables and their footers."""


def markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def fmt(x, spec=".1f", missing="-"):
  return missing if x is None else format(x, spec)


def gib(n):
  return None if n is None else n / 2**30


def cpu_line(results):
  parts = [
      f"{r['framework']} {r['cpu_user_ms']:.0f} + {r['cpu_sys_ms']:.0f} ms, {r['minflt']:.0f} faults"
      for r in results
      if "cpu_user_ms" in r
  ]
  head = "process CPU per timed step (user + system, minor page faults): "
  return head + ", ".join(parts) if parts else ""


def load_line(results):
  """'1-min load average before/after each worker' (only meaningful on a shared CPU)."""
  parts = [f"{r['framework']} {r['load_avg'][0]:.1f}/{r['load_avg'][1]:.1f}" for r in results if "load_avg" in r]
  return ("1-min load average before/after each framework: " + ", ".join(parts)) if parts else ""
