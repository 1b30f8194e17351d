"""The TPU planning table (docs/tpu_planning.md): `python -m pixelbert_jax.aot` over configs and slices.

  python -m bench.tpu_plan run [--only NAME ...]     # compile each job, one JSON each in --out (resumable)
  python -m bench.tpu_plan table                     # the markdown table from the JSON files

Each job is one run of the planner in its own process (libtpu, no TPU needed). A paper-size step takes
minutes to compile on a laptop CPU, and a refusal (too large) tens of seconds, so `run` skips jobs whose
JSON exists and can be stopped and restarted; `table` marks what was not compiled.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from pixelbert_jax import tpu_slices

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "tpu_plan"

CONFIGS = {
    "pretrain r50": "configs/pretrain.py:r50",
    "pretrain x152": "configs/pretrain.py:x152",
    "vqa r50": "configs/vqa.py:r50",
    "retrieval r50": "configs/retrieval.py:r50",
}
SLICES = ("v4-8", "v4-32", "v5litepod-16", "v5litepod-64", "v5p-8")
# The largest per-device batch depends on the chip, not on the slice: the meshes are data-parallel, so each
# device holds the whole state and its own examples. It is searched on one slice per chip.
CHIP_SLICE = {"v4": "v4-8", "v5litepod": "v5litepod-16", "v5p": "v5p-8"}
# Where --find_max_batch starts, per device: a step this large is refused by each chip for r50, so the
# search halves from there.
MAX_BATCH_START = {"v4": 64, "v5litepod": 32, "v5p": 256}


def _family(topology: str) -> str:
  return topology.split("-")[0]


def jobs(out: pathlib.Path = OUT) -> dict[str, list[str]]:
  """name -> planner arguments, in the order `run` takes them: chip by chip (v4, then v5e, then v5p), for
  every config the chip's `max` (the largest per-device batch, remat on, searched on one slice), then a
  `plan` per slice of that chip (the config as written, searching the fewest micro-batches that fit, from
  the fewest that the chip's `max` allows when that is known); last, `max` with remat off (from remat's largest
  batch down)."""
  result, remat_off = {}, {}
  for family, chip_slice in CHIP_SLICE.items():
    for config_name, config in CONFIGS.items():
      key = config_name.replace(" ", "_")
      found = _plans(out).get(f"{key}__{chip_slice}__max_remat_on")
      # Without remat a step keeps every layer's activations, so it needs at least what it needs with remat:
      # its largest batch is at most remat's, and the search starts there (one compile when they are equal).
      off_start = (found or {}).get("max_per_device") or MAX_BATCH_START[family]
      for remat, into, start in (("on", result, MAX_BATCH_START[family]), ("off", remat_off, off_start)):
        into[f"{key}__{chip_slice}__max_remat_{remat}"] = [
            f"--config={config}",
            f"--topology={chip_slice}",
            "--find_max_batch",
            f"--max_batch_start={start}",
            f"--config.model.remat={remat == 'on'}",
        ]
      for topology in (t for t in SLICES if _family(t) == family):
        k = _fewest(found, topology)
        result[f"{key}__{topology}__plan"] = [f"--config={config}", f"--topology={topology}"] + (
            [f"--min_accum_steps={k}"] if k else []
        )
  return result | remat_off


def run(names: list[str], out: pathlib.Path, timeout_s: int, screen: bool) -> None:
  out.mkdir(parents=True, exist_ok=True)
  unknown = [n for n in names if n not in jobs(out)]
  if unknown:
    raise SystemExit(f"error: unknown job {unknown[0]!r} (python -m bench.tpu_plan list)")
  for name in names or list(jobs(out)):
    args = jobs(out)[name] + (["--screen"] if screen else [])  # again: a plan starts where a finished max says
    target = out / f"{name}.json"
    if target.exists():
      continue
    t = time.monotonic()
    print(f"{name}: {' '.join(args)}", flush=True)
    cmd = [sys.executable, "-m", "pixelbert_jax.aot", *args, f"--json_out={target}"]
    with open(out / f"{name}.log", "w") as log:  # the planner's progress, line by line
      try:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
      except subprocess.TimeoutExpired:
        print(f"  stopped after {timeout_s} s", flush=True)
        continue
    lines = [s for s in (out / f"{name}.log").read_text().splitlines() if s.startswith(("verdict", "largest", "error"))]
    print("  " + "\n  ".join(lines), f"({time.monotonic() - t:.0f} s)", flush=True)


def _plans(out: pathlib.Path) -> dict[str, dict]:
  return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


def _fewest(found: dict | None, topology: str) -> int | None:
  """The fewest micro-batches whose per-device share of the config's batch is at most the chip's largest
  per-device batch (a micro-batch larger than that cannot fit: accumulation only adds memory). One JAX
  device per chip on every listed slice, all of them data-parallel."""
  if not found or not found.get("max_per_device"):
    return None
  per_device = found["batch_size"] // _chips(topology)
  return next(
      (k for k in range(1, per_device + 1) if per_device % k == 0 and per_device // k <= found["max_per_device"]), None
  )


def _refused_above(found: dict) -> list[int]:
  return [t["per_device"] for t in found["tried"] if not t["fits"] and t["per_device"] > found["max_per_device"]]


def _largest(found: dict | None, with_remat: dict | None = None) -> str:
  """'40 (41 refused)' from a --find_max_batch JSON; 's' marks a screened search (buffer assignment only). A
  remat-off search that fits where it starts (remat's largest batch) is bounded by remat's refusal."""
  if not found:
    return "not compiled"
  mark = " s" if found.get("screened") else ""
  refused = _refused_above(found)
  if refused:
    return f"{found['max_per_device']}{mark} ({min(refused)} refused)"
  bound = _refused_above(with_remat) if with_remat else []
  return f"{found['max_per_device']}{mark}" + (f" ({min(bound)} refused with remat)" if bound else "")


def _chips(topology: str) -> int:
  return tpu_slices.parse_slice(topology)[2]


def table(out: pathlib.Path) -> str:
  """One row per config and slice. Memory and fit are XLA's (compiled; `s`: screened, judged from XLA's
  buffer assignment); hours are estimates. A row whose plan was not compiled gets its hours from the FLOPs
  per example of the same config measured on another slice (marked *)."""
  plans = _plans(out)
  rows = [
      "| config | slice | chips | the paper's batch: fits? | micro-batches x per device | memory per device "
      "| largest per-device batch, remat on / off | est. hours, paper schedule | est. chip-hours |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for config_name in CONFIGS:
    key = config_name.replace(" ", "_")
    measured = [q for n, q in plans.items() if n.startswith(key + "__") and q.get("flops_per_example")]
    for topology in SLICES:
      plan = plans.get(f"{key}__{topology}__plan")
      found = [plans.get(f"{key}__{CHIP_SLICE[_family(topology)]}__max_remat_{r}") for r in ("on", "off")]
      chips = _chips(topology)
      mark = " s" if plan and plan.get("screened") else ""
      if plan and plan["fits"]:
        fit = ("as written" if plan.get("fits_as_written") else f"grad_accum_steps={plan['accum']}") + mark
        split = f"{plan['accum']} x {plan['per_device']}"
        mem = f"{plan['memory_gib']['total']:.1f} of {plan['usable_hbm_gib']:.2f} GiB{mark}"
      else:
        fit = ("no" + mark) if plan else "not compiled"
        split = mem = "-"
      hours, star = (plan.get("est_hours"), "") if plan and plan["fits"] else (None, "")
      if hours is None and measured:  # the same FLOPs per example, at this slice's peak
        q = measured[0]
        peak = tpu_slices.parse_slice(topology)[0].peak_flops  # per chip
        per_example_s = q["flops_per_example"] / (q["utilization"] * peak * chips)
        hours, star = q["steps"] * q["batch_size"] * per_example_s / 3600 if q.get("steps") else None, "*"
      largest = f"{_largest(found[0])} / {_largest(found[1], found[0])}"
      h = f"{hours:.1f}{star}" if hours else "-"
      ch = f"{hours * chips:.0f}{star}" if hours else "-"
      rows.append(f"| {config_name} | {topology} | {chips} | {fit} | {split} | {mem} | {largest} | {h} | {ch} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("run", "table", "list"))
  parser.add_argument("--only", nargs="*", default=[], help="job names, run in this order (see `list`)")
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  parser.add_argument("--timeout_s", type=int, default=3600, help="per job")
  parser.add_argument("--screen", action="store_true", help="the planner's --screen: buffer assignment only")
  args = parser.parse_args()
  if args.command == "list":
    print("\n".join(jobs(args.out)))
  elif args.command == "run":
    run(args.only, args.out, args.timeout_s, args.screen)
  else:
    print(table(args.out))


if __name__ == "__main__":
  main()
