"""Loss curves as PNG with Pillow alone (no plotting library): for the demo and the README."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
              size: tuple[int, int] = (640, 400), y_label: str = "") -> Image.Image:
  """One panel: each name -> (x values, y values) drawn as a line, with axes, ticks and a legend.

  Non-finite points are left out.
  """
  width, height = size
  left, right, top, bottom = 64, 16, 32, 40
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  points = {name: (np.asarray(x, float), np.asarray(y, float)) for name, (x, y) in series.items()}
  points = {name: (x[np.isfinite(y)], y[np.isfinite(y)]) for name, (x, y) in points.items()}
  xs = np.concatenate([x for x, _ in points.values()] or [np.zeros(1)])
  ys = np.concatenate([y for _, y in points.values()] or [np.zeros(1)])
  x0, x1 = (xs.min(), xs.max()) if xs.size else (0.0, 1.0)
  y0, y1 = (ys.min(), ys.max()) if ys.size else (0.0, 1.0)
  x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
  pad = 0.05 * (y1 - y0)
  y0, y1 = y0 - pad, y1 + pad
  to_px = lambda x, y: (left + (x - x0) / (x1 - x0) * (width - left - right),
                        height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))
  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for t in np.linspace(0, 1, 5):
    xv, yv = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
    px, _ = to_px(xv, y0)
    _, py = to_px(x0, yv)
    draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
    draw.text((px - 12, height - bottom + 6), f"{xv:.0f}", fill="black", font=font)
    draw.line([left - 4, py, left, py], fill="black")
    draw.text((4, py - 6), f"{yv:.3g}", fill="black", font=font)
  draw.text((left, 8), title, fill="black", font=font)
  if y_label:
    draw.text((width - right - 6 * len(y_label), 8), y_label, fill="black", font=font)
  for i, (name, (x, y)) in enumerate(points.items()):
    colour = COLOURS[i % len(COLOURS)]
    if x.size > 1:
      draw.line([to_px(a, b) for a, b in zip(x, y)], fill=colour, width=2)
    elif x.size == 1:
      px, py = to_px(x[0], y[0])
      draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    draw.text((left + 8, top + 6 + 14 * i), f"-- {name}", fill=colour, font=font)
  return image


def curves_from_metrics(records: list[dict], keys: Sequence[str]
                        ) -> dict[str, tuple[list[float], list[float]]]:
  """metrics.jsonl records -> {key: (steps, values)} for the keys present."""
  series = {}
  for key in keys:
    pairs = [(r["step"], r[key]) for r in records if key in r]
    if pairs:
      series[key] = ([p[0] for p in pairs], [p[1] for p in pairs])
  return series


def side_by_side(panels: Sequence[Image.Image]) -> Image.Image:
  """Panels in one row."""
  width = sum(p.width for p in panels)
  out = Image.new("RGB", (width, max(p.height for p in panels)), "white")
  x = 0
  for panel in panels:
    out.paste(panel, (x, 0))
    x += panel.width
  return out
