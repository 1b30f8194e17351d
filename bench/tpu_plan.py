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

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "tpu_plan"

CONFIGS = {
    "pretrain r50": "configs/pretrain.py:r50",
    "pretrain x152": "configs/pretrain.py:x152",
    "vqa r50": "configs/vqa.py:r50",
    "retrieval r50": "configs/retrieval.py:r50",
}
SLICES = ("v4-8", "v4-32", "v5litepod-16", "v5litepod-64", "v5p-8")
# Where --find_max_batch starts, per device: a paper-size step this large is refused by each chip (a refusal
# takes about a minute to compile; every batch that fits takes ten), so the search halves from there.
MAX_BATCH_START = {"v4": 64, "v5litepod": 32, "v5p": 256}


def jobs() -> dict[str, list[str]]:
  """name -> planner arguments. `plan`: the config as written (its batch, remat on), searching the fewest
  micro-batches that fit; `max`: the largest per-device batch, with remat on and off, from `start` down."""
  out = {}
  for config_name, config in CONFIGS.items():
    key = config_name.replace(" ", "_")
    for topology in SLICES:
      out[f"{key}__{topology}__plan"] = [f"--config={config}", f"--topology={topology}"]
      for remat in ("on", "off"):
        out[f"{key}__{topology}__max_remat_{remat}"] = [
            f"--config={config}",
            f"--topology={topology}",
            "--find_max_batch",
            f"--max_batch_start={MAX_BATCH_START[topology.split('-')[0]]}",
            f"--config.model.remat={remat == 'on'}",
        ]
  return out


def run(names: list[str], out: pathlib.Path, timeout_s: int) -> None:
  out.mkdir(parents=True, exist_ok=True)
  known = jobs()
  unknown = [n for n in names if n not in known]
  if unknown:
    raise SystemExit(f"error: unknown job {unknown[0]!r} (python -m bench.tpu_plan list)")
  for name in names or list(known):
    args = known[name]
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


def _bounds(plan: dict | None) -> str:
  """What a plan's own tries say of the largest micro-batch: the largest that fit and the smallest refused."""
  if not plan:
    return ""
  fit = [t["per_device"] for t in plan["tried"] if t["fits"]]
  refused = [t for t in plan["tried"] if not t["fits"] and (not fit or t["per_device"] > max(fit))]
  if not fit:
    return ""
  smallest = min(refused, key=lambda t: t["per_device"]) if refused else None
  why = "" if not smallest else " (VMEM)" if "vmem" in smallest["refusal"] else ""
  return f">= {max(fit)}" + (f", {smallest['per_device']} refused{why}" if smallest else "")


def _largest(found: dict | None) -> str:
  if not found:
    return ""
  refused = [t["per_device"] for t in found["tried"] if not t["fits"] and t["per_device"] > found["max_per_device"]]
  return f"{found['max_per_device']}" + (f" ({min(refused)} refused)" if refused else "")


def table(out: pathlib.Path) -> str:
  """One row per config and slice. Memory and fit are XLA's (compiled); hours are estimates. A slice that
  was not compiled gets hours derived from a compiled slice of the same chip and config (marked *): the
  same FLOPs per example over more or fewer devices."""
  plans = _plans(out)
  rows = [
      "| config | slice | chips | the paper's batch: fits? (XLA) | micro-batches x per device | memory per device "
      "(XLA) | largest per-device batch, remat on / off (XLA) | est. hours, paper schedule | est. chip-hours |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for config_name in CONFIGS:
    key = config_name.replace(" ", "_")
    for topology in SLICES:
      family, n = topology.split("-")
      plan = plans.get(f"{key}__{topology}__plan")
      found = [plans.get(f"{key}__{topology}__max_remat_{r}") for r in ("on", "off")]
      chips = int(n) // (2 if family in ("v4", "v5p") else 1)
      hours, mark = None, ""
      if plan and plan["fits"]:
        fit = "as written" if plan.get("fits_as_written") else f"with grad_accum_steps={plan['accum']}"
        split = f"{plan['accum']} x {plan['per_device']}"
        mem = f"{plan['memory_gib']['total']:.1f} of {plan['usable_hbm_gib']:.2f} GiB"
        hours = plan.get("est_hours")
      else:
        fit = "no" if plan else "not compiled"
        split = mem = "-"
        sibling = next(
            (q for t in SLICES if t.startswith(family + "-") and (q := plans.get(f"{key}__{t}__plan")) and q["fits"]),
            None,
        )
        if sibling and sibling.get("est_hours"):
          hours, mark = (
              sibling["est_hours"] * sibling["devices"] / (chips * (sibling["devices"] // _chips(sibling))),
              "*",
          )
      largest = " / ".join(
          _largest(f) or (_bounds(plan) if i == 0 else "") or "not compiled" for i, f in enumerate(found)
      )
      h = f"{hours:.1f}{mark}" if hours else "-"
      ch = f"{hours * chips:.0f}{mark}" if hours else "-"
      rows.append(f"| {config_name} | {topology} | {chips} | {fit} | {split} | {mem} | {largest} | {h} | {ch} |")
  return "\n".join(rows)


def _chips(plan: dict) -> int:
  family, n = plan["topology"].split("-")
  return int(n) // (2 if family in ("v4", "v5p") else 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("run", "table", "list"))
  parser.add_argument("--only", nargs="*", default=[], help="job names, run in this order (see `list`)")
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  parser.add_argument("--timeout_s", type=int, default=3600, help="per job")
  args = parser.parse_args()
  if args.command == "list":
    print("\n".join(jobs()))
  elif args.command == "run":
    run(args.only, args.out, args.timeout_s)
  else:
    print(table(args.out))


if __name__ == "__main__":
  main()
