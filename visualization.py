"""Draw token-grid maps over the original image with OpenCV colormaps.

`overlay` is the one public drawing function the rest of the tool builds on; `heatmap_image`,
`side_by_side` and `draw_grid` are views built from the same private helpers. The part of the
image the model never saw (outside `image_box_xyxy`) is hatched and never colour-mapped.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from attention_processor import normalize_heatmap
from errors import InputError
from records import cell_edges

COLORMAPS: dict[str, int | np.ndarray] = {  # OpenCV colormaps, and look-up tables
    "jet": cv2.COLORMAP_JET,
    "turbo": cv2.COLORMAP_TURBO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "cividis": cv2.COLORMAP_CIVIDIS,
    "hot": cv2.COLORMAP_HOT,
    "bone": cv2.COLORMAP_BONE,
    "rainbow": cv2.COLORMAP_RAINBOW,
    "ocean": cv2.COLORMAP_OCEAN,
    "parula": cv2.COLORMAP_PARULA,
}


def _diverging_lut() -> np.ndarray:
    """(256, 1, 3) BGR: blue through near-white to red (Moreland's cool-warm end points), for maps that
    are signed (contrasts) and centred at 0."""
    cool, middle, warm = np.array([59, 76, 192.0]), np.array([221, 221, 221.0]), np.array([180, 4, 38.0])
    t = np.linspace(-1.0, 1.0, 256)[:, None]
    rgb = np.where(t < 0, middle + (cool - middle) * -t, middle + (warm - middle) * t)
    return np.round(rgb[:, ::-1]).astype(np.uint8)[:, None, :]


DIVERGING = "coolwarm"  # the colormap of signed maps: 0 is the middle of the bar
COLORMAPS[DIVERGING] = _diverging_lut()
Interpolation = Literal["nearest", "bilinear", "bicubic"]
_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_UNSEEN_GREY = np.array([128, 128, 128], dtype=np.float32)


def colormap_lut(colormap: str) -> np.ndarray:
    """(256, 3) uint8 RGB: the colour of each level 0..255 of a colormap (for a page that draws it itself)."""
    if colormap not in COLORMAPS:
        raise InputError(f"Unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}.")
    levels = np.arange(256, dtype=np.uint8)[:, None]  # (256, 1)
    return cv2.cvtColor(cv2.applyColorMap(levels, COLORMAPS[colormap]), cv2.COLOR_BGR2RGB)[:, 0, :]


def _box_pixels(box_xyxy) -> tuple[int, int, int, int]:
    """The box rounded to whole pixels (may extend past the image)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"image_box_xyxy {tuple(box_xyxy)} is empty; it must satisfy x0 < x1 and y0 < y1.")
    return x0, y0, x1, y1


def _scaled(heatmap: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Map values to 0..1: by `value_range`, or by the map's own min and max when None."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D array (grid_h, grid_w), got shape {heatmap.shape}.")
    return normalize_heatmap(heatmap, "minmax" if value_range is None else "fixed", value_range=value_range)


def colorize(unit: np.ndarray, size_wh: tuple[int, int], colormap: str, interpolation: Interpolation) -> np.ndarray:
    """(grid_h, grid_w) in 0..1 → (h, w, 3) RGB uint8 at `size_wh`."""
    if colormap not in COLORMAPS:
        raise InputError(f"Unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}.")
    if interpolation not in _INTERPOLATIONS:
        raise InputError(f"Unknown interpolation {interpolation!r}; choose one of {sorted(_INTERPOLATIONS)}.")
    resized = cv2.resize(unit, size_wh, interpolation=_INTERPOLATIONS[interpolation])  # (h, w) float32
    levels = cv2.convertScaleAbs(resized, alpha=255.0)  # (h, w) uint8, clipped
    bgr = cv2.applyColorMap(levels, COLORMAPS[colormap])  # (h, w, 3) BGR
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # OpenCV is BGR; everything else here is RGB


def _hatch_unseen(canvas: np.ndarray, inside: np.ndarray) -> None:
    """Grey out and hatch, in place, the pixels outside the grid's box: the model never saw them."""
    if inside.all():
        return
    height, width = inside.shape
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = ((xx + yy) // 6) % 3 == 0  # diagonal hatch
    outside = ~inside
    faded = 0.35 * canvas[outside] + 0.65 * _UNSEEN_GREY
    canvas[outside] = faded.astype(np.uint8)
    hatched = outside & stripes
    canvas[hatched] = (0.5 * canvas[hatched] + 127.5).astype(np.uint8)


def hatch(picture: Image.Image, unseen: np.ndarray) -> Image.Image:
    """The picture with the pixels where `unseen` (H, W bool) is True greyed and hatched, as the part of an
    image a model never saw is drawn everywhere."""
    canvas = _as_array(picture)
    _hatch_unseen(canvas, ~np.asarray(unseen, dtype=bool))
    return _to_image(canvas)


def _paint(base: np.ndarray, heatmap, box_xyxy, colormap, alpha, interpolation, value_range) -> np.ndarray:
    """Blend the colour-mapped grid into `base` (h, w, 3 uint8, in place) inside the box; hatch the rest."""
    height, width = base.shape[:2]
    x0, y0, x1, y1 = _box_pixels(box_xyxy)
    color = colorize(_scaled(heatmap, value_range), (x1 - x0, y1 - y0), colormap, interpolation)  # box-sized
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)  # box ∩ image
    inside = np.zeros((height, width), dtype=bool)
    if cx1 > cx0 and cy1 > cy0:
        inside[cy0:cy1, cx0:cx1] = True
        patch = color[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]  # (ch, cw, 3)
        region = base[cy0:cy1, cx0:cx1]
        base[cy0:cy1, cx0:cx1] = cv2.addWeighted(region, 1.0 - alpha, patch, alpha, 0.0)
    _hatch_unseen(base, inside)
    return base


def _as_array(image: Image.Image) -> np.ndarray:
    return np.array(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3) RGB, writable copy


def _to_image(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(canvas, mode="RGB")


def overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    box_xyxy,
    colormap: str = "jet",
    alpha: float = 0.5,
    interpolation: Interpolation = "bilinear",
    value_range: tuple[float, float] | None = None,
    grid: bool = False,
) -> Image.Image:
    """The map blended over the image, at the original size.

    image: the original (upright) image. heatmap: (grid_h, grid_w) values.
    box_xyxy: the region of the original image the grid covers, in its pixels.
    value_range: values mapped to the colormap's ends; None = this map's own min and max.
    alpha: 0 returns the image unchanged inside the box, 1 shows only the colours.
    grid: draw the token grid's cell borders.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be between 0 and 1, got {alpha}.")
    canvas = _paint(_as_array(image), heatmap, box_xyxy, colormap, alpha, interpolation, value_range)
    return draw_grid(_to_image(canvas), np.shape(heatmap), box_xyxy) if grid else _to_image(canvas)


def heatmap_image(
    image: Image.Image,
    heatmap: np.ndarray,
    box_xyxy,
    colormap: str = "jet",
    interpolation: Interpolation = "bilinear",
    value_range: tuple[float, float] | None = None,
    grid: bool = False,
) -> Image.Image:
    """The colour-mapped grid alone, at the image's size; the unseen part is hatched grey."""
    blank = np.full((image.size[1], image.size[0], 3), 255, dtype=np.uint8)
    canvas = _paint(blank, heatmap, box_xyxy, colormap, 1.0, interpolation, value_range)
    return draw_grid(_to_image(canvas), np.shape(heatmap), box_xyxy) if grid else _to_image(canvas)


SIDE_BY_SIDE_GAP = 8


def side_by_side(left: Image.Image, right: Image.Image, gap: int = SIDE_BY_SIDE_GAP) -> Image.Image:
    """Two images next to each other on white, top-aligned."""
    width, height = left.size[0] + gap + right.size[0], max(left.size[1], right.size[1])
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.size[0] + gap, 0))
    return canvas


# Every picture sent to a browser fits this (px on its longer side, and pixels in all); a download, twice it.
DISPLAY_MAX_SIDE, DISPLAY_MAX_PIXELS = 4096, 16_000_000
DOWNLOAD_MAX_SIDE, DOWNLOAD_MAX_PIXELS = 8192, 64_000_000


def fit_within(
    picture: Image.Image, max_side: int = DISPLAY_MAX_SIDE, max_pixels: int = DISPLAY_MAX_PIXELS
) -> Image.Image:
    """The picture itself when it fits `max_side` and `max_pixels`, else a copy scaled down to fit (aspect kept)."""
    width, height = picture.size
    factor = min(1.0, max_side / max(width, height), (max_pixels / (width * height)) ** 0.5)
    if factor >= 1.0:
        return picture
    return picture.resize((max(1, int(width * factor)), max(1, int(height * factor))), Image.BILINEAR)


def tiled(pictures: list[Image.Image], max_width: int = DISPLAY_MAX_SIDE, gap: int = SIDE_BY_SIDE_GAP) -> Image.Image:
    """Pictures left to right on white, top-aligned, starting a new row below wherever the next one would
    pass `max_width`; the first stays at (0, 0), so clicks on it keep their coordinates."""
    rows, row, width = [], [], 0
    for picture in pictures:
        if row and width + gap + picture.size[0] > max_width:
            rows.append(row)
            row, width = [], 0
        width += (gap if row else 0) + picture.size[0]
        row.append(picture)
    rows.append(row)
    widths = [sum(p.size[0] for p in r) + gap * (len(r) - 1) for r in rows]
    heights = [max(p.size[1] for p in r) for r in rows]
    canvas = Image.new("RGB", (max(widths), sum(heights) + gap * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for r, height in zip(rows, heights, strict=True):
        x = 0
        for picture in r:
            canvas.paste(picture, (x, y))
            x += picture.size[0] + gap
        y += height + gap
    return canvas


def draw_grid(
    image: Image.Image, grid_hw: tuple[int, int], box_xyxy, color: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Thin lines on the borders of the token cells inside the box."""
    canvas = np.array(image.convert("RGB"))  # (H, W, 3) uint8, writable
    xs, ys = (np.round(edges).astype(int) for edges in cell_edges(grid_hw, box_xyxy))  # (grid_w + 1,), (grid_h + 1,)
    for y in ys:
        cv2.line(canvas, (int(xs[0]), int(y)), (int(xs[-1]), int(y)), color, 1)
    for x in xs:
        cv2.line(canvas, (int(x), int(ys[0])), (int(x), int(ys[-1])), color, 1)
    return Image.fromarray(canvas)


LABEL_MAX_PX = 28  # labels stay readable on wide pictures without growing past a heading


def labelled(picture: Image.Image, label: str, font_px: int | None = None) -> Image.Image:
    """The picture with `label` written on a white strip under it (`font_px` high; by default from its width)."""
    font = ImageFont.load_default(size=font_px or min(LABEL_MAX_PX, max(12, picture.size[0] // 40)))
    _, _, x1, y1 = font.getbbox(label)  # text extent in px
    pad = 6
    width, strip = max(picture.size[0], x1 + 2 * pad), y1 + 2 * pad
    canvas = Image.new("RGB", (width, picture.size[1] + strip), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    ImageDraw.Draw(canvas).text((pad, picture.size[1] + pad), label, fill=(0, 0, 0), font=font)
    return canvas


def _colorbar_font(width: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(11, min(18, width // 45)))


def colorbar_strip(width: int) -> int:
    """The height in px of the strip `with_colorbar` adds under a picture `width` px wide."""
    return 2 * _colorbar_font(width).size + 3 * 6


def with_colorbar(picture: Image.Image, colormap: str, value_range: tuple[float, float], unit: str) -> Image.Image:
    """The picture with a colour bar on a white strip under it: the colormap from the lowest shown value
    (left) to the highest (right), each end labelled in `unit` (what the colours measure)."""
    lo, hi = (float(v) for v in value_range)
    if colormap not in COLORMAPS:
        raise InputError(f"Unknown colormap {colormap!r}; choose one of {sorted(COLORMAPS)}.")
    width = picture.size[0]
    font, pad, bar_h = _colorbar_font(width), 6, _colorbar_font(width).size
    ramp = np.linspace(0, 255, max(2, width - 2 * pad)).astype(np.uint8)[None, :]  # (1, bar_w)
    bar = cv2.applyColorMap(ramp, COLORMAPS[colormap])[:, :, ::-1]  # OpenCV is BGR: to RGB, (1, bar_w, 3)
    canvas = Image.new("RGB", (width, picture.size[1] + colorbar_strip(width)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(Image.fromarray(np.repeat(bar, bar_h, axis=0)), (pad, picture.size[1] + pad))
    draw = ImageDraw.Draw(canvas)
    y = picture.size[1] + bar_h + 2 * pad
    low, high = f"{lo:.3g}", f"{hi:.3g}"
    draw.text((pad, y), low, fill=(0, 0, 0), font=font)
    draw.text((width - pad - font.getbbox(high)[2], y), high, fill=(0, 0, 0), font=font)
    label_w = font.getbbox(unit)[2]
    if label_w + font.getbbox(low)[2] + font.getbbox(high)[2] + 4 * pad < width:  # only where it fits
        draw.text(((width - label_w) // 2, y), unit, fill=(60, 60, 60), font=font)
    return canvas
