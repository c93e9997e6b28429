"""A study's localisation plots as PNG files: pointing accuracy per (layer, head) as a matrix, and per layer
as bars. Drawn with PIL on the viridis colours of `visualization.colorize`, on a fixed 0-1 scale, with
0-based layer and head labels as everywhere else in the tool; cells without data are grey."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visualization import colorize

_MARGIN, _TITLE_PX = 12, 30
_GREY, _INK, _RULE = (200, 200, 200), (30, 30, 30), (225, 225, 225)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _cell_px(rows: int, cols: int) -> int:
    """Side of one matrix cell: 40 px, smaller for big models so the picture stays under about 1400 px."""
    return int(np.clip(1400 // max(rows, cols, 1), 8, 40))


def layer_head_matrix_png(accuracy: np.ndarray, layers: list[int], path: str | Path, title: str) -> Path:
    """accuracy: (L, H) in 0..1 (NaN = no data), row i for layer `layers[i]`, column j for head j."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    rows, cols = accuracy.shape
    cell, font = _cell_px(rows, cols), _font(12)
    left, top = 64, _TITLE_PX + 22  # room for layer and head labels
    width = max(left + cols * cell + _MARGIN, 360)
    canvas = Image.new("RGB", (width, top + rows * cell + 64), (255, 255, 255))
    unit = np.nan_to_num(np.clip(accuracy, 0.0, 1.0), nan=0.0).astype(np.float32)  # (L, H)
    cells = colorize(unit, (cols * cell, rows * cell), "viridis", "nearest")  # (L*cell, H*cell, 3) RGB
    cells[np.repeat(np.repeat(np.isnan(accuracy), cell, axis=0), cell, axis=1)] = _GREY
    canvas.paste(Image.fromarray(cells), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((_MARGIN, _MARGIN), title, fill=_INK, font=_font(14))
    draw.text((left - 6, top - 4), "head", fill=_INK, font=font, anchor="rs")
    for j in range(cols):
        if cell >= 20 or j % 5 == 0:
            draw.text((left + j * cell + cell // 2, top - 4), str(j), fill=_INK, font=font, anchor="ms")
    for i, layer in enumerate(layers):
        if cell >= 14 or i % 5 == 0:
            draw.text((left - 6, top + i * cell + cell // 2), f"layer {layer}", fill=_INK, font=font, anchor="rm")
        for j in range(cols):
            if cell >= 32 and not np.isnan(accuracy[i, j]):  # values where they fit
                ink = (255, 255, 255) if accuracy[i, j] < 0.6 else (0, 0, 0)  # viridis is dark below 0.6
                draw.text(
                    (left + j * cell + cell // 2, top + i * cell + cell // 2),
                    f"{accuracy[i, j]:.2f}",
                    fill=ink,
                    font=_font(11),
                    anchor="mm",
                )
    _colour_bar(canvas, left, top + rows * cell + 14)
    canvas.save(path, format="PNG")
    return Path(path)


def _colour_bar(canvas: Image.Image, x: int, y: int, length: int = 200) -> None:
    """The 0-1 scale under the matrix."""
    ramp = colorize(np.linspace(0.0, 1.0, length, dtype=np.float32)[None, :], (length, 12), "viridis", "nearest")
    canvas.paste(Image.fromarray(ramp), (x, y))
    draw, font = ImageDraw.Draw(canvas), _font(12)
    draw.text((x, y + 16), "0", fill=_INK, font=font)
    draw.text((x + length, y + 16), "1", fill=_INK, font=font, anchor="ra")
    draw.text((x + length // 2, y + 16), "pointing accuracy", fill=_INK, font=font, anchor="ma")


def accuracy_by_layer_png(accuracy: np.ndarray, layers: list[int], path: str | Path, title: str) -> Path:
    """accuracy: (L,) in 0..1 for layers `layers`, as bars with their values, on a 0-1 axis."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    bar = int(np.clip(900 // max(len(layers), 1), 10, 48))
    left, top, height = 44, _TITLE_PX + 16, 220
    width = max(left + len(layers) * bar + _MARGIN, 420)
    canvas = Image.new("RGB", (width, top + height + 40), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font(12)
    draw.text((_MARGIN, _MARGIN), title, fill=_INK, font=_font(14))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + round((1 - tick) * height)
        draw.line((left, y, left + len(layers) * bar, y), fill=_RULE)
        draw.text((left - 6, y), f"{tick:g}", fill=_INK, font=font, anchor="rm")
    colours = colorize(
        np.clip(np.nan_to_num(accuracy), 0, 1).astype(np.float32)[None, :], (len(layers), 1), "viridis", "nearest"
    )[0]  # (L, 3) the matrix's colours
    for k, (layer, value) in enumerate(zip(layers, accuracy, strict=True)):
        x0 = left + k * bar + 2
        if not np.isnan(value):
            y0 = top + round((1 - min(max(value, 0.0), 1.0)) * height)
            draw.rectangle((x0, y0, x0 + bar - 5, top + height), fill=tuple(int(c) for c in colours[k]))
            if bar >= 30:
                draw.text((x0 + (bar - 4) // 2, y0 - 3), f"{value:.2f}", fill=_INK, font=_font(11), anchor="ms")
        if bar >= 24 or k % 5 == 0:
            draw.text((x0 + (bar - 4) // 2, top + height + 6), str(layer), fill=_INK, font=font, anchor="mt")
    draw.text((left, top + height + 22), "layer", fill=_INK, font=font)
    canvas.save(path, format="PNG")
    return Path(path)
