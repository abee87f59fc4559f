"""The SVG charts of peftcli's pages, drawn here (no plotting or JavaScript library, no network, no
external font): axes with their ticks, a frame mapping data to pixels, series as lines or labelled
points, and the chart around them. Every label is escaped."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Axis:
    """A linear or log10 axis: its title, its range and its ticks as (value, label)."""

    title: str
    lo: float
    hi: float
    ticks: tuple[tuple[float, str], ...]
    log: bool = False

    def fraction(self, value: float) -> float:
        """Where `value` lies between lo (0) and hi (1)."""
        if self.log:
            return (math.log10(value) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (value - self.lo) / (self.hi - self.lo)


def linear_axis(title: str, values: list[float]) -> Axis:
    """Ticks at round steps (1, 2 or 5 x 10^k), the range widened to whole steps."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # one value, or all equal: a range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step((hi - lo) / 5)
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    decimals = max(0, -math.floor(math.log10(step)))
    ticks = tuple((lo + i * step, f"{lo + i * step:.{decimals}f}") for i in range(round((hi - lo) / step) + 1))
    return Axis(title, lo, hi, ticks)


def padded_axis(title: str, values: list[float]) -> Axis:
    """linear_axis over `values` with 5% of their range added at both ends: no point on the frame's edge."""
    margin = 0.05 * (max(values) - min(values)) if values else 0.0
    return linear_axis(title, [*values, *([min(values) - margin, max(values) + margin] if values else [])])


def nice_step(raw: float) -> float:
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def log_axis(title: str, values: list[float]) -> Axis:
    """Whole decades around the values, a tick at each power of ten. Parameter counts of methods
    span four or more orders of magnitude (BitFit's thousands to full fine-tuning's millions)."""
    positive = [v for v in values if v > 0] or [1.0, 10.0]
    lo = math.floor(math.log10(min(positive)))
    hi = max(math.ceil(math.log10(max(positive))), lo + 1)
    ticks = tuple((10.0**e, power_label(e)) for e in range(lo, hi + 1))
    return Axis(f"{title} (log scale)", 10.0**lo, 10.0**hi, ticks, log=True)


def power_label(exponent: int) -> str:
    """10^exponent as parameter counts are written: 1, 10, 100, 1k, 10k, 100k, 1M, ..., 1B."""
    for e, suffix in ((9, "B"), (6, "M"), (3, "k")):
        if exponent >= e:
            return f"{10 ** (exponent - e)}{suffix}"
    return str(10**exponent) if exponent >= 0 else f"1e{exponent}"


@dataclass(frozen=True)
class Series:
    """Points of one colour: joined by a line, or (`labelled`) single points with their name beside."""

    name: str
    points: list[tuple[float, float]]
    color: str
    labelled: bool = False


@dataclass(frozen=True)
class Frame:
    """The plot area inside the SVG and the mapping from data to pixels."""

    x: Axis
    y: Axis
    left: float = 72
    top: float = 40
    width: float = 540
    height: float = 250

    def px(self, v: float) -> float:
        return self.left + self.x.fraction(v) * self.width

    def py(self, v: float) -> float:
        return self.top + self.height - self.y.fraction(v) * self.height


def svg_chart(
    title: str,
    x: Axis,
    y: Axis,
    series: list[Series],
    width: int = 640,
    height: int = 340,
    extras: Callable[[Frame], list[str]] | None = None,
    css_class: str = "",
) -> str:
    """One chart; `extras` draws more over the series (the run page's best-step mark and values)."""
    frame = Frame(x, y, width=width - 72 - 28, height=height - 40 - 50)
    css = f' class="{css_class}"' if css_class else ""
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"{css} font-family="sans-serif" font-size="12" role="img" '
            f'aria-label="{escape(title)}">'
        ),
        f"<title>{escape(title)}</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{frame.left}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
        *grid(frame),
        *[svg_series(s, frame) for s in series],
        *(extras(frame) if extras is not None else []),
        *point_labels([s for s in series if s.labelled], frame),
        *legend([s for s in series if not s.labelled], width),
        "</svg>",
    ]
    return "\n".join(parts)


def grid(f: Frame) -> list[str]:
    """Grid lines and tick labels for both axes, the frame, and the axis titles."""
    bottom, right = f.top + f.height, f.left + f.width
    parts = []
    for v, label in f.x.ticks:
        parts.append(f'<line x1="{f.px(v):.1f}" y1="{f.top}" x2="{f.px(v):.1f}" y2="{bottom}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{f.px(v):.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>')
    for v, label in f.y.ticks:
        parts.append(f'<line x1="{f.left}" y1="{f.py(v):.1f}" x2="{right}" y2="{f.py(v):.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{f.left - 6}" y="{f.py(v) + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    parts.append(f'<rect x="{f.left}" y="{f.top}" width="{f.width}" height="{f.height}" fill="none" stroke="#999"/>')
    parts.append(
        f'<text x="{f.left + f.width / 2:.1f}" y="{bottom + 38}" text-anchor="middle">{escape(f.x.title)}</text>'
    )
    middle = f.top + f.height / 2
    parts.append(
        f'<text x="16" y="{middle:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {middle:.1f})">{escape(f.y.title)}</text>'
    )
    return parts


def svg_series(s: Series, f: Frame) -> str:
    xy = [(f.px(x), f.py(y)) for x, y in s.points]
    parts = []
    if not s.labelled and len(xy) > 1:
        d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        parts.append(f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="2"/>')
    if s.labelled or len(xy) <= 60:  # dots on a long curve are noise
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4 if s.labelled else 3}" fill="{s.color}"/>' for x, y in xy]
    return "".join(parts)


LABEL_OFFSETS = ((7, -6), (7, 14), (7, -20), (7, 28), (7, -34), (7, 42))
Box = tuple[float, float, float, float]  # a label's (left, top, right, bottom) in pixels


def is_free(box: Box, placed: list[Box]) -> bool:
    """Whether `box` overlaps none of the boxes placed before it."""
    return all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed)


def point_labels(series: list[Series], f: Frame) -> list[str]:
    """Each labelled point's name beside it: above right, or the first place further up or down
    where it overlaps no name placed before (runs of similar size and score sit close together)."""
    placed: list[Box] = []
    parts = []
    for s in series:
        width = 7 * len(s.name)  # about 7 px a character at font size 12
        for x, y in ((f.px(a), f.py(b)) for a, b in s.points):
            boxes = [(x + dx, y + dy - 11, x + dx + width, y + dy + 2) for dx, dy in LABEL_OFFSETS]
            box = next((b for b in boxes if is_free(b, placed)), boxes[0])
            placed.append(box)
            parts.append(f'<text x="{box[0]:.1f}" y="{box[3] - 2:.1f}" fill="{s.color}">{escape(s.name)}</text>')
    return parts


def legend(series: list[Series], width: int) -> list[str]:
    parts, x = [], width - 28
    for s in reversed(series):  # right-aligned: laid out from the right edge
        x -= 7 * len(s.name) + 24
        parts.append(f'<rect x="{x:.0f}" y="11" width="10" height="10" fill="{s.color}"/>')
        parts.append(f'<text x="{x + 14:.0f}" y="20">{escape(s.name)}</text>')
    return parts
