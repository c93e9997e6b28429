"""The per-head gallery: one small overlay per (layer, head) of the selected ranges, as tiles, one
sheet or a ZIP, named `S{step}_L{layer}_H{head}` (1-based, like the reference LLaVA toolkit)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable

from PIL import Image

from analysis import vision_maps
from attention_processor import normalize_heatmap
from records import AttentionRun
from utils import scale_box, scaled_size
from visualization import labelled, overlay


def file_stem(step_idx: int, layer_idx: int | None = None, head_idx: int | None = None) -> str:
    """The file label of 0-based indices: (0, 2, 3) -> 'S1_L3_H4', (4,) -> 'S5'.

    Files are numbered from 1, as the reference LLaVA toolkit labels them; this is the only
    place that converts. JSON logs keep the 0-based indices.
    """
    parts = [f"S{step_idx + 1}"]
    if layer_idx is not None:
        parts.append(f"L{layer_idx + 1}")
    if head_idx is not None:
        parts.append(f"H{head_idx + 1}")
    return "_".join(parts)


def head_gallery(
    run: AttentionRun, image: Image.Image, step_idx: int, layers, heads, colormap: str = "jet", thumb: int = 160
) -> list[tuple[str, Image.Image]]:
    """Small overlays of every (layer, head) in the ranges, in row-major order, each labelled with its
    0-based layer and head as the app numbers them; the names (for files) are 1-based
    `S{step}_L{layer}_H{head}` like the reference LLaVA toolkit."""
    maps = vision_maps(run, step_idx, layers, heads)  # (l, h, gh, gw)
    scale = thumb / max(image.size)
    small = image.resize(scaled_size(image.size, scale))
    box = scale_box(run.vision.image_box_xyxy, scale)
    tiles = []
    for i, layer_idx in enumerate(run.layers_in(layers)):
        for j, head_idx in enumerate(range(heads[0], heads[1] + 1)):
            name = file_stem(step_idx, layer_idx, head_idx)
            tile = overlay(small, normalize_heatmap(maps[i, j]), box, colormap=colormap, value_range=(0, 1))
            tiles.append((name, labelled(tile, f"layer {layer_idx} · head {head_idx}")))
    return tiles


def gallery_sheet(tiles: list[tuple[str, Image.Image]], columns: int) -> Image.Image:
    """All tiles on one sheet, `columns` per row (one row per layer when columns = number of heads)."""
    width, height = tiles[0][1].size
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (width + 4), rows * (height + 4)), "white")
    for k, (_, tile) in enumerate(tiles):
        sheet.paste(tile, ((k % columns) * (width + 4), (k // columns) * (height + 4)))
    return sheet


def gallery_zip(tiles: Iterable[tuple[str, Image.Image]]) -> bytes:
    """A ZIP of the tiles as `S{step}_L{layer}_H{head}.png`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, tile in tiles:
            png = io.BytesIO()
            tile.save(png, format="PNG")
            archive.writestr(f"{name}.png", png.getvalue())
    return buffer.getvalue()
