"""What is drawn on or beside a single image's main map: its other views (a global view, a thumbnail,
pan-and-scan crops), a ground-truth target box with the map's scores against it, and picked cells."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from attention_processor import combine_maps, image_shares, normalize_heatmap
from metrics import attention_ratio, otsu_iou, pointing_hit, target_mask
from pictures.stored_run import StoredRun, ViewSettings, layout_heatmap, method_index, method_set
from utils import scaled_size
from visualization import DISPLAY_MAX_SIDE, SIDE_BY_SIDE_GAP, heatmap_image, labelled, overlay, side_by_side, tiled


def outline_cells(stored: StoredRun, picture: Image.Image, cells, view: str) -> Image.Image:
    """A copy of a single image's picture (as `render` drew it) with token cells (row, col) outlined:
    the region picked by clicks. In the side-by-side view the map is the right half."""
    if not cells:
        return picture
    shown, _ = stored.display(0)
    offset = shown.size[0] + SIDE_BY_SIDE_GAP if view == "side_by_side" else 0
    picture = picture.copy()
    draw = ImageDraw.Draw(picture)
    for row, col in cells:
        x0, y0, x1, y1 = stored.display_box(0, stored.run.vision.cell_box_xyxy(row, col))
        x1, y1 = max(x1, x0 + 6), max(y1, y0 + 6)  # drawable even for tiny cells
        draw.rectangle((x0 + offset, y0, x1 + offset - 1, y1 - 1), outline=(255, 255, 255), width=2)
        draw.rectangle((x0 + offset + 2, y0 + 2, x1 + offset - 3, y1 - 3), outline=(0, 0, 0), width=1)
    return picture


def outline_target(picture: Image.Image, box_xyxy, x_offsets=(0,)) -> Image.Image:
    """A copy with the ground-truth box (in the picture's pixels) outlined in green and black, at each
    horizontal offset (both halves of the side-by-side view)."""
    picture = picture.copy()
    draw = ImageDraw.Draw(picture)
    x0, y0, x1, y1 = box_xyxy
    x1, y1 = max(x1, x0 + 2), max(y1, y0 + 2)  # visible even when under a display pixel
    for dx in x_offsets:
        draw.rectangle((x0 + dx - 1, y0 - 1, x1 + dx, y1), outline=(0, 0, 0), width=1)
        draw.rectangle((x0 + dx, y0, x1 + dx - 1, y1 - 1), outline=(0, 230, 64), width=2)
    return picture


def target_scores(stored: StoredRun, s: ViewSettings, heat: np.ndarray) -> str:
    """The caption's scores of this map against the target box: the pointing game, the attention ratio
    and the Otsu IoU (`metrics`), on the main view's token grid."""
    x0, y0, x1, y1 = (round(v) for v in s.target_box)
    head = f"Target box ({x0}, {y0})–({x1}, {y1}):"
    layout = stored.run.vision
    if heat.shape != tuple(layout.grid_hw) or s.relative:
        return (
            f"{head} scores need a map of attention mass on the token grid; untick 'Relative to a generic "
            "prompt' or pick the attention, rollout or gradient map to score it."
        )
    try:
        region = target_mask(layout.image_size, [s.target_box])
    except ValueError:  # empty: outside the image, or flat
        return f"{head} it holds no pixel of the image; draw it inside the picture."
    mass = np.clip(heat, 0.0, None)
    hit = pointing_hit(mass, layout, region)
    return (
        f"{head} pointing game {'hit' if hit else 'miss'} (the peak cell's centre is "
        f"{'inside' if hit else 'outside'} the box) · attention ratio {attention_ratio(mass, layout, region):.2f} "
        f"(1 = no more than the box's share of the area) · Otsu IoU {otsu_iou(mass, layout, region):.2f}."
    )


OTHER_VIEW_SCALE = 0.5  # the other views are drawn at half the main map's size, so renders stay fast


def _half_size(stored: StoredRun):
    """The first image's display copy at OTHER_VIEW_SCALE, and a function taking a box in original
    pixels to that copy's pixels: what the panels beside the main map are drawn on."""
    shown, (sx, sy) = stored.display(0)
    small = shown.resize(scaled_size(shown.size, OTHER_VIEW_SCALE), Image.BILINEAR)
    fx, fy = small.size[0] / shown.size[0] * sx, small.size[1] / shown.size[1] * sy  # small px per original px

    def on_small(box):
        return box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy

    return small, on_small


def with_other_views(stored: StoredRun, s: ViewSettings, picture: Image.Image, text: str) -> tuple[Image.Image, str]:
    """The main view's picture with the image's other views (a global view, a thumbnail, pan-and-scan
    crops, each cut to its own part of the image) to its right, at half size, each labelled and on its
    own scale. Clicks on the main picture keep their coordinates."""
    run, main = stored.run, stored.run.vision
    small, on_small = _half_size(stored)
    parts = [labelled(picture, f"{main.view} · {main.grid_hw[0]}x{main.grid_hw[1]}")]
    shares = image_shares(run, s.step_idx, s.layers, s.heads) if s.prompt_pos is None else None
    notes = []
    for index, layout in enumerate(run.visions[1:], start=1):
        heat = layout_heatmap(run, s, index)
        unit = normalize_heatmap(heat, "percentile" if s.normalization == "percentile" else "minmax", s.percentile)
        box = on_small(layout.image_box_xyxy)
        draw = dict(colormap=s.colormap, interpolation=s.interpolation, value_range=(0.0, 1.0), grid=s.grid)
        side = (
            heatmap_image(small, unit, box, **draw)
            if s.view == "heatmap"
            else overlay(small, unit, box, alpha=s.alpha, **draw)
        )
        if s.target_box is not None:
            side = outline_target(side, on_small(s.target_box))
        x0, y0, x1, y1 = layout.image_box_xyxy
        whole = x0 <= 0.5 and y0 <= 0.5 and x1 >= layout.image_size[0] - 0.5 and y1 >= layout.image_size[1] - 0.5
        if not whole:  # a crop: show its own part only
            left, top = max(0, int(box[0])), max(0, int(box[1]))
            side = side.crop(
                (
                    left,
                    top,
                    max(left + 1, min(side.size[0], round(box[2]))),
                    max(top + 1, min(side.size[1], round(box[3]))),
                )
            )
        parts.append(labelled(side, f"{layout.view} · {layout.grid_hw[0]}x{layout.grid_hw[1]}"))
        share = (
            ""
            if shares is None
            else f", {shares[index]:.0%} of the attention against {shares[0]:.0%} on the {main.view}"
        )
        notes.append(
            f"{layout.view} ({layout.grid_hw[0]}×{layout.grid_hw[1]} cells over "
            f"{'the whole image' if whole else 'its own part of the image'}{share})"
        )
    strip = tiled(parts, max(DISPLAY_MAX_SIDE, parts[0].size[0]))  # more views than fit: a row below
    return strip, (
        f"{text} Left: the {main.view}, the main map. Right (and below), at half size: "
        + "; ".join(notes)
        + "; each min–max on its own scale, always the raw attention."
    )


def with_parts(stored: StoredRun, s: ViewSettings, picture: Image.Image, text: str) -> tuple[Image.Image, str]:
    """The picture with what the method built its map from (TAM: the raw logit map and the interference
    it removed) to its right, at half size, each labelled and min–max on its own scale."""
    maps = method_set(stored, s)
    parts = getattr(maps, "parts", None) or {}
    if not parts:
        return picture, text + f" The {s.method} map has no parts to show beside it (TAM has)."
    small, on_small = _half_size(stored)
    box = on_small(stored.run.vision.image_box_xyxy)
    draw = dict(colormap=s.colormap, interpolation=s.interpolation, value_range=(0.0, 1.0), grid=s.grid)
    strip, names = picture, []
    for name, part in parts.items():
        if s.combined:
            heat = combine_maps([part[t] for t in s.steps], s.combine)
        else:
            heat = part[method_index(stored, s)]
        unit = normalize_heatmap(heat, "minmax")
        tile = heatmap_image(small, unit, box, **draw) if s.view == "heatmap" else overlay(small, unit, box, **draw)
        strip = side_by_side(strip, labelled(tile, f"{name} · peak {float(heat.max()):.3g}"))
        names.append(name)
    return strip, f"{text} Right, at half size, each min–max on its own scale: the {' and the '.join(names)}."


def mark_corner(stored: StoredRun, picture: Image.Image, corner_xy, view: str) -> Image.Image:
    """A copy of a single image's picture with a cross at the box's first corner (original-image pixels),
    so the user sees where the box starts; in the side-by-side view on both halves."""
    shown, _ = stored.display(0)
    x, y, _, _ = stored.display_box(0, (corner_xy[0], corner_xy[1], corner_xy[0], corner_xy[1]))
    picture = picture.copy()
    draw = ImageDraw.Draw(picture)
    offsets = (0, shown.size[0] + SIDE_BY_SIDE_GAP) if view == "side_by_side" else (0,)
    for dx in offsets:
        for colour, width, arm in (((0, 0, 0), 4, 9), ((0, 220, 0), 2, 8)):  # a dark rim under a green cross
            draw.line((x + dx - arm, y, x + dx + arm, y), fill=colour, width=width)
            draw.line((x + dx, y - arm, x + dx, y + arm), fill=colour, width=width)
    return picture
