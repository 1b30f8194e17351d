"""Training curves of a workdir's metrics.jsonl as one PNG, for runs where TensorBoard is not at hand.

  python -m pixelbert_jax.plot --workdir WORKDIR --out curves.png

metrics.jsonl holds one JSON object per line with a "step" and metrics named like train/loss, eval/itm_acc,
eval/mlm_acc_grounded, warm_start/colour_acc. They are drawn in panels: losses; training accuracies; eval
metrics; the grounded-word probe (eval/mlm_acc_grounded against its shuffled-image control and the majority
rate); the CNN warm start; learning rates (log axis); the rest but perf/* (throughput is not a learning curve).
Drawn with PIL alone (no matplotlib). A missing workdir or metrics file is a one-line `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, Sequence

from etils import epath
from PIL import Image, ImageDraw, ImageFont

from pixelbert_jax import cli_errors, paths

PANEL_W, PANEL_H = 620, 380
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 16, 30, 44
LEGEND_LINE = 15
COLUMNS = 2
# matplotlib's tab10, so the colours look familiar
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


class PlotError(ValueError):
  """Bad input to the plotter; the message is one line."""


def read_metrics(path: epath.Path) -> tuple[dict[str, list[tuple[int, float]]], int]:
  """metrics.jsonl -> ({name: [(step, value)] sorted by step, the last value of a step kept}, bad lines).

  A line that is not a JSON object with an integer step (say, half written by a running job) is skipped and
  counted; non-numeric and non-finite values are left out."""
  series: dict[str, dict[int, float]] = {}
  bad = 0
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError):
      bad += 1
      continue
    for name, value in record.items():
      if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      if math.isfinite(value):
        series.setdefault(name, {})[step] = float(value)  # a resumed run logs a step again: keep the last
  return {k: sorted(v.items()) for k, v in series.items()}, bad


def _unit_interval(points: list[tuple[int, float]]) -> bool:
  return all(0.0 <= v <= 1.0 for _, v in points)


LOG_PANELS = ("learning rates",)  # drawn on a log10 axis when every value is positive (warm-up spans decades)
# (title, does the metric belong here): each metric goes to the first panel that takes it.
PANELS: tuple[tuple[str, Callable[[str, list], bool]], ...] = (
    ("losses", lambda k, p: "loss" in k and not k.startswith("warm_start/")),
    (
        "grounded-word probe (eval: shuffled images and majority rate are the controls)",
        lambda k, p: "grounded" in k and _unit_interval(p),
    ),
    ("training accuracies", lambda k, p: k.startswith("train/") and "acc" in k and _unit_interval(p)),
    ("eval metrics", lambda k, p: k.startswith("eval/") and _unit_interval(p)),
    ("CNN warm start", lambda k, p: k.startswith("warm_start/")),
    ("learning rates", lambda k, p: k.startswith("train/lr")),
    ("other", lambda k, p: not k.startswith("perf/")),
)


def group(series: dict[str, list[tuple[int, float]]]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
  """The non-empty panels, in PANELS' order, each with its metrics in name order."""
  panels: dict[str, dict[str, list]] = {title: {} for title, _ in PANELS}
  for name in sorted(series):
    for title, takes in PANELS:
      if takes(name, series[name]):
        panels[title][name] = series[name]
        break
  return [(title, panels[title]) for title, _ in PANELS if panels[title]]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About `count` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
  if hi <= lo:
    return [lo]
  raw = (hi - lo) / max(1, count)
  power = 10 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
  first = math.ceil(lo / step - 1e-9) * step
  return [first + i * step for i in range(int(math.floor((hi - first) / step + 1e-9)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
  """log10 positions of round values (1, 2, 5 times a power of ten; powers alone over 3+ decades) in [lo, hi]."""
  multipliers = (1,) if hi - lo >= 3 else (1, 2, 5)
  ticks = [e + math.log10(m) for e in range(math.floor(lo), math.ceil(hi) + 1) for m in multipliers]
  return [t for t in ticks if lo <= t <= hi] or [lo]


def _fmt(v: float) -> str:
  if v == 0:
    return "0"
  if abs(v) >= 1e4 or abs(v) < 1e-3:
    return f"{v:.0e}"
  return f"{v:.4g}"


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
    return ImageFont.load_default()


def draw_panel(title: str, metrics: dict[str, list[tuple[int, float]]], x_range: tuple[int, int]) -> Image.Image:
  """One chart: axes with round ticks, a line per metric (dots where a metric has few points), a legend."""
  font, small = _font(14), _font(11)
  legend_h = LEGEND_LINE * math.ceil(len(metrics) / 2) + 6
  img = Image.new("RGB", (PANEL_W, PANEL_H + legend_h), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  draw.text((MARGIN_L, 6), title, font=font, fill=(0, 0, 0))
  x0, y0, x1, y1 = MARGIN_L, MARGIN_T, PANEL_W - MARGIN_R, PANEL_H - MARGIN_B  # plot area, y grows down
  log = title in LOG_PANELS and all(v > 0 for points in metrics.values() for _, v in points)
  if log:
    metrics = {k: [(s, math.log10(v)) for s, v in points] for k, points in metrics.items()}
  values = [v for points in metrics.values() for _, v in points]
  lo, hi = min(values), max(values)
  if hi - lo < 1e-12:
    lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
  pad = 0.04 * (hi - lo)
  lo, hi = lo - pad, hi + pad
  s_lo, s_hi = x_range if x_range[1] > x_range[0] else (x_range[0] - 1, x_range[0] + 1)
  to_x = lambda s: x0 + (s - s_lo) / (s_hi - s_lo) * (x1 - x0)
  to_y = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)
  for t in (log_ticks(lo, hi) if log else nice_ticks(lo, hi)):
    y = to_y(t)
    draw.line((x0, y, x1, y), fill=(232, 232, 232))
    label = _fmt(10**t if log else t)
    draw.text((x0 - 6 - draw.textlength(label, font=small), y - 6), label, font=small, fill=(60, 60, 60))
  for t in nice_ticks(s_lo, s_hi, 6):
    x = to_x(t)
    draw.line((x, y0, x, y1), fill=(240, 240, 240))
    label = _fmt(t) if t < 1e4 else f"{t:.0f}"
    draw.text((x - draw.textlength(label, font=small) / 2, y1 + 5), label, font=small, fill=(60, 60, 60))
  draw.text(((x0 + x1) / 2 - 12, y1 + 20), "step", font=small, fill=(60, 60, 60))
  draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
  for k, (name, points) in enumerate(metrics.items()):
    colour = PALETTE[k % len(PALETTE)]
    xy = [(to_x(s), to_y(v)) for s, v in points]
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2, joint="curve")
    if len(xy) <= 30:  # eval and warm-start metrics have a few points: show each
      for x, y in xy:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    lx = MARGIN_L + (k % 2) * (PANEL_W - MARGIN_L) // 2
    ly = PANEL_H + (k // 2) * LEGEND_LINE
    draw.line((lx, ly + 7, lx + 18, ly + 7), fill=colour, width=3)
    last = 10 ** points[-1][1] if log else points[-1][1]
    draw.text((lx + 24, ly), f"{name} ({_fmt(last)})", font=small, fill=(0, 0, 0))
  return img


def plot(workdir: str, out: str) -> dict:
  """Draws workdir/metrics.jsonl into `out` (a PNG); -> dict(out, panels, metrics, skipped_lines)."""
  wd = epath.Path(paths.resolve(workdir))
  if not wd.exists():
    raise PlotError(f"workdir {workdir} does not exist")
  if not wd.is_dir():
    raise PlotError(f"workdir {workdir} is not a folder")
  path = wd / "metrics.jsonl"
  if not path.exists():
    raise PlotError(f"no metrics.jsonl in {workdir} (the workdir of a run that has logged)")
  series, bad = read_metrics(path)
  panels = group(series)
  if not panels:
    raise PlotError(f"{path} holds no metrics to draw ({bad} unreadable lines)")
  steps = [s for _, metrics in panels for points in metrics.values() for s, _ in points]
  charts = [draw_panel(title, metrics, (min(steps), max(steps))) for title, metrics in panels]
  cols = min(COLUMNS, len(charts))
  rows = math.ceil(len(charts) / cols)
  row_h = [max(c.height for c in charts[r * cols : (r + 1) * cols]) for r in range(rows)]
  header = 26
  sheet = Image.new("RGB", (cols * PANEL_W, header + sum(row_h)), (255, 255, 255))
  ImageDraw.Draw(sheet).text(
      (8, 5), f"{workdir}  (metrics.jsonl, step {min(steps)}..{max(steps)})", font=_font(14), fill=(0, 0, 0)
  )
  for k, chart in enumerate(charts):
    r, c = divmod(k, cols)
    sheet.paste(chart, (c * PANEL_W, header + sum(row_h[:r])))
  target = epath.Path(paths.resolve(out))
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(str(target), format="PNG", optimize=True)
  except (OSError, ValueError) as e:
    raise PlotError(f"cannot write {out}: {e}") from e
  return dict(
      out=str(target), panels=[t for t, _ in panels], metrics=sorted(n for _, m in panels for n in m), skipped_lines=bad
  )


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pixelbert_jax.plot", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training workdir (holds metrics.jsonl)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--verbose", action="store_true", help="on failure, print the traceback")
  args = parser.parse_args(argv)
  return cli_errors.run_command(lambda: plot(args.workdir, args.out), usage_errors=(PlotError,), verbose=args.verbose)


if __name__ == "__main__":
  sys.exit(main())
