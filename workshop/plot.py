"""Figures with Pillow only: heat maps, bar and line charts, scatter plots, colour bars.

The workshop's drawing kit, used by the tug-of-war analysis (analysis.py), the training curves
(curves.py) and the routing map (ask.py). Nothing here knows about Uni-Med.
"""
import math
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lib.files import atomic

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (110, 110, 110), (225, 225, 225)
TASK_COLOURS = {"vqa": (31, 119, 180), "refer": (255, 127, 14), "identify": (44, 160, 44),
                "caption": (214, 39, 40), "cls": (148, 103, 189), "qa": (140, 86, 75)}
SERIES_COLOURS = [(76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179),  # seaborn deep
                  (147, 120, 96), (218, 139, 195), (140, 140, 140), (204, 185, 116), (100, 181, 205)]
DIVERGING = [(33, 102, 172), (103, 169, 207), (247, 247, 247), (239, 138, 98), (178, 24, 43)]  # blue-white-red
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font


def colour(scale: list, t: float) -> tuple:
    """t in [0, 1] -> RGB, linear between the scale's evenly spaced anchors."""
    t = min(max(float(t), 0.0), 1.0) * (len(scale) - 1)
    k = min(int(t), len(scale) - 2)
    a, b, f = scale[k], scale[k + 1], t - k
    return tuple(round(x + (y - x) * f) for x, y in zip(a, b))


def ink_on(rgb: tuple) -> tuple:
    return BLACK if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else WHITE


def text(canvas: Image.Image, xy: tuple, s: str, size: int = 14, anchor: str = "mm", angle: int = 0,
         fill: tuple = BLACK) -> tuple:
    """Draw `s` with its box anchored at xy ("l/m/r" then "t/m/b"), rotated by `angle` degrees
    counter-clockwise; returns the (width, height) it took."""
    f = font(size)
    left, top, right, bottom = f.getbbox(s)
    stamp = Image.new("RGBA", (max(1, right - left), max(1, bottom - top)), (0, 0, 0, 0))
    ImageDraw.Draw(stamp).text((-left, -top), s, font=f, fill=fill)
    stamp = stamp.rotate(angle, expand=True)
    w, h = stamp.size
    x = xy[0] - {"l": 0, "m": w // 2, "r": w}[anchor[0]]
    y = xy[1] - {"t": 0, "m": h // 2, "b": h}[anchor[1]]
    canvas.paste(stamp, (int(x), int(y)), stamp)
    return w, h


def text_size(s: str, size: int = 14) -> tuple:
    left, top, right, bottom = font(size).getbbox(s)
    return right - left, bottom - top


def colour_bar(canvas, x: int, y: int, height: int, scale: list, vmin: float, vmax: float, label: str) -> None:
    """A vertical colour scale at (x, y): vmax at the top, three ticks, and its label beside it."""
    draw = ImageDraw.Draw(canvas)
    for k in range(height):
        draw.line([(x, y + k), (x + 18, y + k)], fill=colour(scale, 1 - k / max(1, height - 1)))
    draw.rectangle([x, y, x + 18, y + height], outline=BLACK)
    width = 0
    for v, yy in ((vmax, y), ((vmin + vmax) / 2, y + height // 2), (vmin, y + height)):
        draw.line([(x + 18, yy), (x + 23, yy)], fill=BLACK)
        width = max(width, text(canvas, (x + 26, yy), f"{v:.2f}", 12, "lm")[0])
    text(canvas, (x + 32 + width, y + height // 2), label, 13, "lm", angle=90)


def heatmap(matrix, rows: list, cols: list, title: str, scale: list, vmin: float, vmax: float,
            xlabel: str, ylabel: str, bar_label: str, cell: int = 62) -> Image.Image:
    """A matrix as coloured cells with their values written in, labelled axes and a colour bar."""
    matrix = np.asarray(matrix, dtype=float)
    row_w = max(text_size(r, 14)[0] for r in rows)
    col_h = max(text_size(c, 14)[0] for c in cols)
    left, top = 40 + row_w + 10, 46
    grid_w, grid_h = cell * len(cols), cell * len(rows)
    width = max(left + grid_w + 120, text_size(title, 17)[0] + 40)
    height = top + grid_h + col_h + 52
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    text(img, (width // 2, 22), title, 17)
    for i, r in enumerate(rows):
        text(img, (left - 8, top + i * cell + cell // 2), r, 14, "rm")
        for j in range(len(cols)):
            v = matrix[i, j]
            fill = LIGHT if not np.isfinite(v) else colour(scale, (v - vmin) / (vmax - vmin))
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell]
            draw.rectangle(box, fill=fill, outline=WHITE)
            text(img, (box[0] + cell // 2, box[1] + cell // 2), "n/a" if not np.isfinite(v) else f"{v:.2f}",
                 13, fill=ink_on(fill))
    for j, c in enumerate(cols):
        text(img, (left + j * cell + cell // 2, top + grid_h + 6), c, 14, "mt", angle=90)
    text(img, (left + grid_w // 2, height - 8), xlabel, 14, "mb")
    text(img, (12, top + grid_h // 2), ylabel, 14, "lm", angle=90)
    colour_bar(img, left + grid_w + 16, top, grid_h, scale, vmin, vmax, bar_label)
    return img


def bar_chart(groups: list, series: dict, title: str, ylabel: str, xlabel: str, fmt: str = "{:.2f}") -> Image.Image:
    """Grouped bars: one group per x label, one bar per series (checkpoint), with a legend."""
    values = np.array(list(series.values()), dtype=float)  # [S, G]
    lo, hi = min(0.0, np.nanmin(values)), max(0.0, np.nanmax(values))
    span = hi - lo if hi > lo else 1.0
    ticks = nice_ticks(lo - (0.08 * span if lo < 0 else 0), hi + 0.12 * span)  # room for the value labels
    lo, hi = ticks[0], ticks[-1]
    bar = 22 if len(series) > 1 else 34
    group_w = bar * len(series) + 26
    rotate = max(text_size(g, 13)[0] for g in groups) > group_w - 4  # x labels upright when they fit
    label_h = max(text_size(g, 13)[0 if rotate else 1] for g in groups)
    left, top, plot_h = 80, 50, 300
    plot_w = max(group_w * len(groups), 280)
    legend_w = max(text_size(s, 13)[0] for s in series) + 60
    width = max(left + plot_w + legend_w + 20, text_size(title, 17)[0] + 40)
    height = top + plot_h + label_h + 50
    img = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(img)
    text(img, (width // 2, 22), title, 17)
    y_of = lambda v: top + plot_h - (v - lo) / (hi - lo) * plot_h
    for v in ticks:  # horizontal grid and tick labels
        draw.line([(left, y_of(v)), (left + plot_w, y_of(v))], fill=LIGHT)
        text(img, (left - 6, y_of(v)), tick_label(v, ticks[1] - ticks[0]), 12, "rm")
    draw.line([(left, y_of(0)), (left + plot_w, y_of(0))], fill=GREY)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=BLACK)
    x0 = left + (plot_w - group_w * len(groups)) // 2
    for g, name in enumerate(groups):
        gx = x0 + g * group_w + 13
        for s in range(len(series)):
            v = values[s, g]
            if not np.isfinite(v):
                continue
            x = gx + s * bar
            draw.rectangle([x, min(y_of(v), y_of(0)), x + bar - 3, max(y_of(v), y_of(0))],
                           fill=SERIES_COLOURS[s % len(SERIES_COLOURS)])
            text(img, (x + (bar - 3) // 2, y_of(v) - 3 if v >= 0 else y_of(v) + 3), fmt.format(v), 10,
                 "mb" if v >= 0 else "mt", angle=90 if len(series) > 1 or len(fmt.format(v)) > 5 else 0)
        text(img, (gx + (group_w - 26) // 2, top + plot_h + 6), name, 13, "mt", angle=90 if rotate else 0)
    text(img, (left + plot_w // 2, height - 8), xlabel, 14, "mb")
    text(img, (14, top + plot_h // 2), ylabel, 14, "lm", angle=90)
    for s, label in enumerate(series):  # legend
        y = top + 10 + s * 22
        swatch = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        draw.rectangle([left + plot_w + 16, y, left + plot_w + 30, y + 14], fill=swatch)
        text(img, (left + plot_w + 36, y + 7), label, 13, "lm")
    return img


def line_chart(series: dict, colours: dict, title: str, xlabel: str, ylabel: str, size: tuple,
               xlim: tuple, ylim: Optional[tuple] = None, show_legend: bool = True,
               smoothed: bool = True, tapered: bool = False) -> Image.Image:
    """Lines over a shared x axis: series {name: (xs, ys)}, each drawn raw (faint) and smoothed
    (full colour, `smooth`), or only raw in full colour when not `smoothed` (an exact curve such as
    the learning rate), with grid, ticks, labelled axes and a legend of the names. `tapered`: each
    line narrower than the one before, so lines lying on one another all show. Values below 1e-2
    or from 1e5 up are written as multiples of a power of ten, named in the y label."""
    width, height = size
    legend_w = max(text_size(n, 13)[0] for n in series) + 48 if show_legend and series else 12
    left, top, right, bottom = 74, 34, width - legend_w, height - 44
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    text(img, (width // 2, 16), title, 15)
    ys = [y for _, values in series.values() for y in values]
    lo, hi = ylim or (min(ys, default=0.0), max(ys, default=1.0))
    if hi - lo <= 1e-12 * max(abs(hi), 1e-30):  # a flat line still needs a y range
        lo, hi = lo - (abs(lo) or 1) * 0.1, hi + (abs(hi) or 1) * 0.1
    yticks, xticks = nice_ticks(lo, hi, 4), nice_ticks(*xlim, 6)
    (lo, hi), (x0, x1) = (yticks[0], yticks[-1]), (xticks[0], xticks[-1])
    top_value = max(abs(lo), abs(hi))
    power = math.floor(math.log10(top_value)) if top_value and not 1e-2 <= top_value < 1e5 else 0
    X = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    Y = lambda y: bottom - (y - lo) / (hi - lo) * (bottom - top)
    for v in yticks:
        draw.line([(left, Y(v)), (right, Y(v))], fill=LIGHT)
        text(img, (left - 6, Y(v)), tick_label(v / 10 ** power, (yticks[1] - yticks[0]) / 10 ** power), 12, "rm")
    for v in xticks:
        draw.line([(X(v), top), (X(v), bottom)], fill=LIGHT)
        text(img, (X(v), bottom + 5), tick_label(v, xticks[1] - xticks[0]), 12, "mt")
    draw.rectangle([left, top, right, bottom], outline=BLACK)
    text(img, ((left + right) // 2, height - 6), xlabel, 13, "mb")
    text(img, (10, (top + bottom) // 2), ylabel + (f" (x 1e{power})" if power else ""), 13, "lm", angle=90)
    for k, (name, (xs, values)) in enumerate(series.items()):
        c, width = colours[name], max(2, 10 - 2 * k) if tapered else 2
        faint = tuple(round(255 - 0.35 * (255 - v)) for v in c)
        for line, fill, w in ((values, faint, 1), (smooth(values), c, width)) if smoothed else ((values, c, width),):
            points = [(X(x), Y(y)) for x, y in zip(xs, line)]
            if len(points) == 1:
                draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=fill)
            else:
                draw.line(points, fill=fill, width=w, joint="curve")
    for k, name in enumerate(series if show_legend else []):
        y = top + 10 + 20 * k
        draw.line([(right + 12, y), (right + 32, y)], fill=colours[name], width=3)
        text(img, (right + 38, y), name, 13, "lm")
    return img


def smooth(values: list) -> list:
    """An exponential moving average over about a fifteenth of the points, debiased at the start
    (as TensorBoard's smoothing); fewer than 30 points stay as they are."""
    weight = 1 - 2 / (max(1, len(values) // 15) + 1)
    out, average = [], 0.0
    for k, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** k))
    return out


def tick_label(v: float, step: float) -> str:
    """A tick value with as many decimals as the tick step needs (0.25 steps: two; 0.005: three)."""
    decimals = next(d for d in range(10) if abs(round(step, d) - step) <= 1e-9 * step)
    return f"{v:.{decimals}f}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    raw = (hi - lo) / count
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def scatter(points, tasks: list, title: str, size: int = 340) -> Image.Image:
    """2-D points coloured by task in a framed square, axes named t-SNE 1 and t-SNE 2."""
    img = Image.new("RGB", (size + 60, size + 80), WHITE)
    draw = ImageDraw.Draw(img)
    text(img, ((size + 60) // 2, 18), title, 15)
    left, top = 40, 38
    draw.rectangle([left, top, left + size, top + size], outline=BLACK)
    text(img, (left + size // 2, top + size + 8), "t-SNE 1", 13, "mt")
    text(img, (14, top + size // 2), "t-SNE 2", 13, "lm", angle=90)
    if points is None:
        text(img, (left + size // 2, top + size // 2), "too few samples", 13, fill=GREY)
        return img
    p = np.asarray(points, dtype=float)
    p = (p - p.min(0)) / np.maximum(p.max(0) - p.min(0), 1e-12)  # [0, 1]^2
    for (x, y), t in zip(p, tasks):
        marker(draw, left + 8 + x * (size - 16), top + 8 + (1 - y) * (size - 16), t)
    return img


def marker(draw: ImageDraw.ImageDraw, x: float, y: float, task: str, r: int = 5) -> None:
    """A task's colour and shape, outlined in white: refer and identify share images, so their points
    can coincide before the connector; the shapes keep both visible."""
    shape = {"vqa": "circle", "refer": "square", "identify": "triangle", "caption": "diamond",
             "cls": "circle", "qa": "square"}[task]
    style = dict(fill=TASK_COLOURS[task], outline=WHITE)
    if shape == "circle":
        draw.ellipse([x - r + 1, y - r + 1, x + r - 1, y + r - 1], **style)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], **style)
    else:
        sides = 3 if shape == "triangle" else 4
        draw.regular_polygon((x, y, r + 1), sides, rotation=0 if sides == 3 else 45, **style)


def legend(tasks: list) -> Image.Image:
    img = Image.new("RGB", (max([text_size(t, 14)[0] for t in tasks] + [40]) + 50, 30 + 24 * len(tasks)), WHITE)
    draw = ImageDraw.Draw(img)
    text(img, (10, 12), "task", 14, "lm")
    for k, t in enumerate(tasks):
        y = 34 + 24 * k
        marker(draw, 18, y, t, r=6)
        text(img, (32, y), t, 14, "lm")
    return img


def stack(images: list, horizontal: bool, title: Optional[str] = None, gap: int = 12) -> Image.Image:
    """Panels side by side (or one above the other), centred, with an optional title above."""
    title_h = 40 if title else 0
    if horizontal:
        w, h = sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)
    else:
        w, h = max(i.width for i in images), sum(i.height for i in images) + gap * (len(images) - 1)
    w = max(w, text_size(title, 19)[0] + 40) if title else w
    out = Image.new("RGB", (w, h + title_h), WHITE)
    if title:
        text(out, (w // 2, 22), title, 19)
    pos = 0
    for i in images:
        out.paste(i, (pos, title_h + (h - i.height) // 2) if horizontal else ((w - i.width) // 2, title_h + pos))
        pos += (i.width if horizontal else i.height) + gap
    return out



def save_png(img: Image.Image, path: str) -> None:
    with atomic(path) as f:
        img.save(f, format="PNG")

