"""The report's SVG plots: lines or steps over time with labelled ticks on both axes, and bars; no plotting library."""

from __future__ import annotations

import math
from html import escape

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def ticks(top: float, *, count: int = 5, whole: bool = False) -> list[float]:
    """Round tick values from 0 to at least `top` (1, 2 or 5 times a power of ten apart; whole numbers if asked)."""
    top = top if top > 0 else 1
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if whole:
        step = max(1, math.ceil(step))
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.2g}"


def line_svg(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str, *,
             steps: bool = False) -> str:
    """One line per series (a step line when `steps`: a count that changes at events, such as distinct findings)."""
    w, h, left, right, top, bottom = 600, 300, 64, 20, 30, 48
    points = [p for pts in series.values() for p in pts] or [(0.0, 0.0)]
    xt = ticks(max(p[0] for p in points))
    yt = ticks(max(p[1] for p in points), whole=steps)
    xmax, ymax = xt[-1], yt[-1]

    def sx(x: float) -> float:
        return left + x / xmax * (w - left - right)

    def sy(y: float) -> float:
        return h - bottom - y / ymax * (h - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="11"><text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for x in xt:
        parts.append(f'<line x1="{sx(x):.1f}" y1="{h - bottom}" x2="{sx(x):.1f}" y2="{h - bottom + 4}" stroke="black"/>'
                     f'<text class="xtick" x="{sx(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{_label(x)}</text>')
    for y in yt:
        parts.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{w - right}" y2="{sy(y):.1f}" stroke="#ddd"/>'
                     f'<text class="ytick" x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>')
    parts.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>'
                 f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">{escape(xlabel)}</text>'
                 f'<text x="14" y="{(top + h - bottom) / 2}" transform="rotate(-90 14 {(top + h - bottom) / 2})" '
                 f'text-anchor="middle">{escape(ylabel)}</text>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(pts) or [(0.0, 0.0)]
        if steps:
            # Distinct findings only change when one is made: hold the level until then.
            path = [(0.0, 0.0)]
            for x, y in pts:
                path += [(x, path[-1][1]), (x, y)]
            pts = path
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        if len(series) > 1:
            parts.append(f'<text x="{w - right - 4}" y="{top + 14 * (i + 1)}" text-anchor="end" fill="{colour}">'
                         f'{escape(name)}</text>')
    return "".join(parts) + "</svg>\n"


def bar_svg(values: dict[str, int], title: str) -> str:
    items = sorted(values.items(), key=lambda kv: -kv[1]) or [("none", 0)]
    w, row = 600, 20
    h = 30 + row * len(items)
    vmax = max(v for _, v in items) or 1
    bars = []
    for i, (k, v) in enumerate(items):
        y = 26 + i * row
        bars.append(f'<text x="130" y="{y + 13}" text-anchor="end">{escape(k)}</text>'
                    f'<rect x="136" y="{y}" width="{(v / vmax) * 360:.1f}" height="{row - 4}" fill="#ff7f0e"/>'
                    f'<text x="{140 + (v / vmax) * 360:.1f}" y="{y + 13}">{v}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">'
            f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>{"".join(bars)}</svg>\n')
