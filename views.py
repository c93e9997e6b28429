"""Render one result: the picture and caption for a token and a view, and the views' helpers.

A `StoredRun` is a generation with its images and the caches that make re-rendering fast;
`render` turns it and a `ViewSettings` into a picture and a caption stating what is drawn.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from analysis import relative_heatmap, sink_cells
from attention_processor import (
    heatmap_range,
    image_shares,
    normalize_heatmap,
    prompt_token_heatmap,
    range_slice,
    token_heatmap,
    vision_share,
)
from records import AttentionRun
from visualization import SIDE_BY_SIDE_GAP, colorize, heatmap_image, labelled, overlay, side_by_side

VIEWS: tuple[str, ...] = ("overlay", "side_by_side", "heatmap")
METHODS: tuple[str, ...] = ("attention", "rollout", "gradient", "vit")
METHOD_CAPTIONS = {"rollout": "attention rollout through all layers (heads averaged, residual mixed in)",
                   "gradient": "gradient-weighted attention, all layers (Chefer et al.)",
                   "vit": "the raw-attention map pushed back through the vision encoder's attention (patch grid)"}


def method_key(s: ViewSettings):
    """Cache key of a method's maps: the ViT-combined map also depends on the raw map's settings."""
    return (s.method, s.layers, s.heads, s.reduce, s.renormalize) if s.method == "vit" else s.method


DISPLAY_NORMALIZATIONS: tuple[str, ...] = ("minmax", "percentile", "shared")


@dataclass
class StoredRun:
    """A run with the pictures its maps are drawn on, and caches for fast re-rendering.

    `images` are the originals, one per layout (a video: one per time step); by default the run's
    own images. Pictures are drawn on bounded display copies (`display`), at most
    `display_max_side` px on the longer side.
    """

    run: AttentionRun
    images: list[Image.Image] = field(default_factory=list)
    shares: np.ndarray = field(default=None)                           # (T, L, H), from vision_share
    baseline: AttentionRun | None = None                                # same image, generic prompt
    method_maps: dict = field(default_factory=dict)                     # method -> [(grid_h, grid_w)] per step
    display_max_side: int = 2048
    _ranges: dict = field(default_factory=dict)
    _sinks: dict = field(default_factory=dict)
    _displays: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.images, Image.Image):
            raise TypeError("StoredRun takes a list of images (StoredRun(run, images=[image])).")
        self.images = list(self.images) or list(self.run.images)
        if not self.images:
            raise ValueError("A stored run needs the pictures its maps are drawn on; this run has none.")
        if self.shares is None:
            self.shares = vision_share(self.run)
        self.system_shares = self.run.segment_shares("system")          # (T, L, H): BOS, system prompt, header

    def display(self, index: int = 0) -> tuple[Image.Image, tuple[float, float]]:
        """Image `index` as drawn: a copy at most `display_max_side` px on its longer side, and its
        scale (display px per original px, x and y). Original-pixel boxes are multiplied by it."""
        if index not in self._displays:
            image = self.images[index]
            factor = min(1.0, self.display_max_side / max(image.size))
            shown = image if factor == 1.0 else image.resize(
                (max(1, round(image.size[0] * factor)), max(1, round(image.size[1] * factor))), Image.BILINEAR)
            self._displays[index] = (shown, (shown.size[0] / image.size[0], shown.size[1] / image.size[1]))
        return self._displays[index]

    def display_box(self, index: int, box_xyxy) -> tuple[float, float, float, float]:
        """A box in original pixels of image `index`, in the pixels of its display copy."""
        _, (sx, sy) = self.display(index)
        x0, y0, x1, y1 = box_xyxy
        return x0 * sx, y0 * sy, x1 * sx, y1 * sy

    def image_share(self, layers, heads, exclude_system: bool = False) -> np.ndarray:
        """(T,) mean share of each token's attention on the image(s), over the selected layers and heads;
        with exclude_system, measured among the tokens after the system prompt."""
        layer_sel = range_slice(layers, self.run.layer_indices, "layer")
        shares = self.shares[:, layer_sel, heads[0]:heads[1] + 1]                   # (T, l, h)
        if exclude_system:
            rest = 1.0 - self.system_shares[:, layer_sel, heads[0]:heads[1] + 1]
            shares = shares / np.clip(rest, 1e-12, None)
        return shares.mean(axis=(1, 2))

    @property
    def image(self) -> Image.Image:
        """The first picture (the one most views draw on)."""
        return self.images[0]

    @property
    def is_single_image(self) -> bool:
        return len(self.run.visions) == 1 and self.run.vision.num_frames == 1

    @property
    def nbytes(self) -> int:
        kept = {id(image): image for image in [*self.images, *self.run.images, *self.run.frames]}
        kept.update((id(image), image) for image, _ in self._displays.values())
        pixels = sum(image.size[0] * image.size[1] * 3 for image in kept.values())
        baseline = self.baseline.nbytes if self.baseline is not None else 0
        methods = sum(heat.nbytes for maps in self.method_maps.values() for heat in maps)
        return self.run.nbytes + pixels + self.shares.nbytes + baseline + methods

    def shared_range(self, settings: ViewSettings) -> tuple[float, float]:
        """(min, max) over every token's map for these settings, cached."""
        key = replace(settings, step_idx=0, prompt_pos=None, normalization="", colormap="", alpha=0.0, view="",
                      grid=False)                                       # over the generated tokens
        if key not in self._ranges:
            self._ranges[key] = heatmap_range([raw_heatmap(self, replace(key, step_idx=t))
                                               for t in range(self.run.num_steps)])
        return self._ranges[key]

    def sinks(self, layers, heads) -> np.ndarray:
        """(grid_h, grid_w) bool sink cells for these ranges, cached."""
        key = (tuple(layers), tuple(heads))
        if key not in self._sinks:
            self._sinks[key] = sink_cells(self.run, layers, heads)
        return self._sinks[key]


@dataclass(frozen=True)
class ViewSettings:
    """Everything that decides one picture. Ranges are 0-based and inclusive."""

    step_idx: int = 0
    layers: tuple[int, int] = (0, 0)
    heads: tuple[int, int] = (0, 0)
    reduce: str = "mean"
    normalization: str = "minmax"            # minmax | percentile | shared
    percentile: float = 99.0
    colormap: str = "jet"
    alpha: float = 0.5
    view: str = "overlay"                    # overlay | side_by_side | heatmap
    grid: bool = False
    renormalize: bool = False                # each head's image attention rescaled to sum to 1
    mask_sinks: bool = False                 # sink cells set to the map's floor
    relative: bool = False                   # divided by the generic-prompt map of the same image
    method: str = "attention"                # attention | rollout | gradient
    exclude_system: bool = False             # shares measured without BOS and the system prompt
    prompt_pos: int | None = None            # show this prompt token's map instead of step_idx's
    interpolation: str = "bilinear"

    @property
    def num_maps(self) -> int:
        """How many (layer, head) maps the ranges select."""
        return (self.layers[1] - self.layers[0] + 1) * (self.heads[1] - self.heads[0] + 1)


def raw_heatmap(stored: StoredRun, s: ViewSettings) -> np.ndarray:
    """(grid_h, grid_w) float32 before display scaling, with the sink and baseline options applied."""
    if s.method != "attention":
        return method_heatmap(stored, s)
    if s.prompt_pos is not None:
        heat = prompt_token_heatmap(stored.run, s.prompt_pos, s.layers, s.heads, s.reduce, s.renormalize)
    else:
        heat = token_heatmap(stored.run, s.step_idx, s.layers, s.heads, s.reduce, s.renormalize)
    if s.relative:
        if stored.baseline is None:
            raise LookupError("The generic-prompt baseline for this image is not computed yet. "
                              "Tick 'Relative to a generic prompt' again to compute it.")
        heat = relative_heatmap(heat, token_heatmap(stored.baseline, 0, s.layers, s.heads, s.reduce,
                                                    s.renormalize))
    return _masked_sinks(stored, s, heat)


def _masked_sinks(stored: StoredRun, s: ViewSettings, heat: np.ndarray) -> np.ndarray:
    """With `mask_sinks`, the sink cells of these ranges set to the floor of the other cells."""
    if s.mask_sinks:
        sinks = stored.sinks(s.layers, s.heads)
        if sinks.any() and not sinks.all():
            heat = np.where(sinks, heat[~sinks].min(), heat).astype(np.float32)
    return heat


def method_heatmap(stored: StoredRun, s: ViewSettings) -> np.ndarray:
    """A rollout or gradient-weighted map, computed beforehand for every generated token."""
    if s.method not in METHODS:
        raise ValueError(f"Unknown method {s.method!r}; choose one of {METHODS}.")
    if s.prompt_pos is not None or s.relative:
        raise ValueError(f"The {s.method} map is for generated tokens, without the generic-prompt division; "
                         "pick a generated token and untick 'Relative to a generic prompt'.")
    maps = stored.method_maps.get(method_key(s))
    if maps is None:
        raise LookupError(f"The {s.method} maps for these settings are not computed yet; select the method "
                          "again to compute them.")
    heat = maps[s.step_idx]
    if s.mask_sinks and s.method == "vit":
        raise ValueError("Sink cells are token cells; untick 'Mask sink cells' for the patch-level ViT map.")
    return _masked_sinks(stored, s, heat)


def render(stored: StoredRun, settings: ViewSettings) -> tuple[Image.Image, str]:
    """The picture for one token and its caption, stating exactly what is drawn."""
    run, s = stored.run, settings
    if s.view not in VIEWS:
        raise ValueError(f"Unknown view {s.view!r}; choose one of {VIEWS}.")
    if not stored.is_single_image:
        return render_strip(stored, settings)
    heat = raw_heatmap(stored, s)                                                   # (grid_h, grid_w)
    if s.normalization == "shared":
        unit = normalize_heatmap(heat, "fixed", value_range=stored.shared_range(s))
    elif s.normalization in ("minmax", "percentile"):
        unit = normalize_heatmap(heat, s.normalization, s.percentile)
    else:
        raise ValueError(f"Unknown normalisation {s.normalization!r}; choose one of {DISPLAY_NORMALIZATIONS}.")
    shown, _ = stored.display(0)
    box = stored.display_box(0, run.vision.image_box_xyxy)
    draw = dict(colormap=s.colormap, interpolation=s.interpolation, value_range=(0.0, 1.0), grid=s.grid)
    if s.view == "heatmap":
        picture = heatmap_image(shown, unit, box, **draw)
    else:
        picture = overlay(shown, unit, box, alpha=s.alpha, **draw)
        if s.view == "side_by_side":
            picture = side_by_side(shown, picture)
    return picture, caption(stored, settings, heat)


def animation_frames(stored: StoredRun, settings: ViewSettings, max_side: int = 512) -> Iterator[Image.Image]:
    """The map moving through the answer: one picture per generated token, in order, with the same
    settings for every frame (choose 'shared' normalisation to compare strengths across tokens), each
    with the token's index and text under it. Frames are at most `max_side` px on the longer side and
    all of one size; they are made one at a time."""
    if not stored.is_single_image:
        raise ValueError("The animation follows the map over one image; this result has several images or "
                         "a video. Generate from one image to animate it.")
    size = font = None
    for step_idx, token in enumerate(stored.run.generated_tokens):
        picture, _ = render(stored, replace(settings, step_idx=step_idx, prompt_pos=None))
        if size is None:
            factor = min(1.0, max_side / max(picture.size))
            size = (max(1, round(picture.size[0] * factor)), max(1, round(picture.size[1] * factor)))
            font = ImageFont.load_default(size=max(12, size[0] // 28))
        strip = int(font.size * 1.8)
        frame = Image.new("RGB", (size[0], size[1] + strip), (255, 255, 255))
        frame.paste(picture.resize(size, Image.BILINEAR) if picture.size != size else picture, (0, 0))
        ImageDraw.Draw(frame).text((6, size[1] + strip // 2), token_label(step_idx, token), fill=(0, 0, 0),
                                   font=font, anchor="lm")
        yield frame


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
        draw.rectangle((x0 + offset, y0, x1 + offset - 1, y1 - 1), outline=(255, 255, 255), width=2)
        draw.rectangle((x0 + offset + 2, y0 + 2, x1 + offset - 3, y1 - 3), outline=(0, 0, 0), width=1)
    return picture


SCREEN_MIN_SIDE = 640          # px: pictures of smaller images are enlarged to about this on screen


def screen_zoom(stored: StoredRun) -> int:
    """Whole-number factor by which a single image's pictures are enlarged on screen, so a small image
    is not shown postage-stamp size; 1 for large images and for several images or a video."""
    if not stored.is_single_image:
        return 1
    shown, _ = stored.display(0)
    return max(1, SCREEN_MIN_SIDE // max(shown.size))


def on_screen(stored: StoredRun, picture: Image.Image) -> Image.Image:
    """The picture enlarged by `screen_zoom` with nearest-neighbour, so token cells keep sharp edges.
    A click at (x, y) on it is at (x, y) / screen_zoom on the picture itself."""
    zoom = screen_zoom(stored)
    return picture if zoom == 1 else picture.resize((picture.size[0] * zoom, picture.size[1] * zoom), Image.NEAREST)


def _panels(stored: StoredRun, s: ViewSettings) -> list[tuple[Image.Image, np.ndarray, tuple, str]]:
    """(image, raw map, box, label) per image of the prompt, or per frame of a video."""
    run, panels = stored.run, []
    shares = image_shares(run, s.step_idx, s.layers, s.heads) if s.prompt_pos is None else None
    for i, layout in enumerate(run.visions):
        if s.prompt_pos is not None:
            heat = prompt_token_heatmap(run, s.prompt_pos, s.layers, s.heads, s.reduce, s.renormalize, i)
        else:
            heat = token_heatmap(run, s.step_idx, s.layers, s.heads, s.reduce, s.renormalize, i)
        share = "" if shares is None else f" · {shares[i]:.0%} of the attention"
        if layout.num_frames == 1:
            panels.append((stored.display(i)[0], heat, stored.display_box(i, layout.image_box_xyxy),
                           f"image {i}{share}"))
        else:
            panels += [(stored.display(f)[0], heat[f], stored.display_box(f, layout.image_box_xyxy),
                        f"time step {f}{share if f == 0 else ''}") for f in range(layout.num_frames)]
    return panels


def render_strip(stored: StoredRun, s: ViewSettings, height: int = 360) -> tuple[Image.Image, str]:
    """Several images (or a video's frames) side by side, each with its map on ONE shared scale."""
    if s.relative or s.mask_sinks or s.method != "attention":
        raise ValueError("'Relative to a generic prompt', 'Mask sink cells' and the rollout and gradient maps work "
                         "with a single image; untick them (method: attention) to compare several images or frames.")
    panels = _panels(stored, s)
    heats = np.concatenate([heat.ravel() for _, heat, _, _ in panels])
    lo, hi = float(heats.min()), float(np.percentile(heats, s.percentile) if s.normalization == "percentile"
                                       else heats.max())
    draw = dict(colormap=s.colormap, interpolation=s.interpolation, value_range=(lo, hi), grid=s.grid)
    tiles = []
    for image, heat, box, label in panels:
        picture = heatmap_image(image, heat, box, **draw) if s.view == "heatmap" else \
            overlay(image, heat, box, alpha=s.alpha, **draw)
        scale = height / picture.size[1]
        tile = picture.resize((max(1, round(picture.size[0] * scale)), height))
        tiles.append(labelled(tile, label))
    strip = tiles[0]
    for tile in tiles[1:]:
        strip = side_by_side(strip, tile)
    kind = "time steps of the video" if stored.run.vision.num_frames > 1 else "images"
    who = (f"Token {s.step_idx} {as_text(repr(stored.run.generated_tokens[s.step_idx]))}" if s.prompt_pos is None
           else f"Prompt token {s.prompt_pos}")
    text = (f"{who} · layers {_range_text(s.layers)} · heads {_range_text(s.heads)} · {s.reduce} · "
            f"{len(panels)} {kind} on one scale (min–{'percentile' if s.normalization == 'percentile' else 'max'} "
            "over all of them), so their colours compare directly.")
    return strip, text


def _range_text(bounds: tuple[int, int]) -> str:
    return f"{bounds[0]}" if bounds[0] == bounds[1] else f"{bounds[0]}–{bounds[1]}"


def caption(stored: StoredRun, s: ViewSettings, heat: np.ndarray) -> str:
    run = stored.run
    norm = {"minmax": "min–max of this map", "percentile": f"min to {s.percentile:g}th percentile (clipped)",
            "shared": "one scale shared by all tokens"}[s.normalization]
    if s.prompt_pos is None:
        share = stored.image_share(s.layers, s.heads, s.exclude_system)[s.step_idx]
        who = f"Token {s.step_idx} {as_text(repr(run.generated_tokens[s.step_idx]))}"
    else:
        share = float(prompt_token_heatmap(run, s.prompt_pos, s.layers, s.heads, "mean").sum())  # mean over heads
        piece = run.prompt_tokens[s.prompt_pos] if run.prompt_tokens else ""
        who = f"Prompt token {s.prompt_pos} {as_text(repr(piece))}"
    grid_h, grid_w = run.vision.grid_hw
    attending = run.layers_in(s.layers)                                  # Qwen3.5: only some layers have maps
    sparse = "" if len(attending) == s.layers[1] - s.layers[0] + 1 else \
        f" (softmax attention only in {', '.join(map(str, attending))}; the others are linear, with no map)"
    maps = len(attending) * (s.heads[1] - s.heads[0] + 1)
    what = (f"layers {_range_text(s.layers)}{sparse} · heads {_range_text(s.heads)} · {s.reduce} of {maps} maps"
            if s.method == "attention" else METHOD_CAPTIONS[s.method])
    text = (f"{who} · {what} · normalised: {norm} · "
            f"{grid_h}×{grid_w} token grid · {share:.0%} of this token's attention is on the image "
            f"(peak cell {heat.max():.3g}).")
    sinks = int(stored.sinks(s.layers, s.heads).sum()) if s.mask_sinks else 0
    options = [name for flag, name in ((s.renormalize, "renormalised within the image"),
                                       (s.mask_sinks, f"{sinks} sink cells masked"),
                                       (s.relative, "divided by the generic-prompt map"),
                                       (s.exclude_system, "shares without BOS and the system prompt")) if flag]
    if options:
        text += " Options: " + ", ".join(options) + "."
    query_pos = s.prompt_pos if s.prompt_pos is not None else len(run.prompt_ids) - 1 + s.step_idx
    if s.method == "attention" and (blind := run.out_of_window(s.layers, query_pos)):
        text += (f" Layers {', '.join(map(str, blind))} attend through a sliding window that no longer reaches "
                 "the image from this token: their maps are truly zero, not hidden.")
    width, height = run.vision.image_size
    x0, y0, x1, y1 = run.vision.image_box_xyxy
    if x0 > 0.5 or y0 > 0.5 or x1 < width - 0.5 or y1 < height - 0.5:
        text += " Hatched: parts of the image the model never saw (outside its crop)."
    return text


def step_labels(num_steps: int) -> list[str]:
    """Step numbers as zero-padded strings ("00", "01", ... "11"), so a bar plot shows one even bar
    per token on a categorical axis that sorts in step order."""
    width = len(str(max(num_steps - 1, 0)))
    return [str(t).zfill(width) for t in range(num_steps)]


def share_table(stored: StoredRun, layers: tuple[int, int], heads: tuple[int, int], step_idx: int,
                exclude_system: bool = False) -> dict:
    """Columns for a plot of the attention share on the image, per generated token."""
    run = stored.run
    shares = stored.image_share(layers, heads, exclude_system)
    return {"step": step_labels(run.num_steps), "share": [float(v) for v in shares],
            "token": [f"{t}: {tok}" for t, tok in enumerate(run.generated_tokens)],
            "selected": ["selected" if t == step_idx else "other" for t in range(run.num_steps)]}




def matrix_view(values: np.ndarray, layers: list[int], heads: tuple[int, int], metric: str) -> dict:
    """The (l, h) values as the interactive heatmap draws them: one row per layer in `layers` (the
    captured layer indices of the rows), one column per head, 0-based labels, each cell's value and
    viridis colour on a scale from 0 to the largest value."""
    top = max(float(values.max()), 1e-6)
    unit = normalize_heatmap(values, "fixed", value_range=(0.0, top))                  # (l, h) in 0..1
    colored = colorize(unit, (unit.shape[1], unit.shape[0]), "viridis", "nearest")     # (l, h, 3) RGB
    scale = colorize(np.linspace(0.0, 1.0, 11)[None, :], (11, 1), "viridis", "nearest")[0]  # (11, 3)

    def hex_of(rgb) -> str:
        return "#" + "".join(f"{int(c):02x}" for c in rgb)
    what = "attention share on the image" if metric == "share" else "spatial entropy of each head's map"
    return {"metric": metric, "title": f"{what}: rows = layers, columns = heads (0-based; click a cell)",
            "layers": list(layers), "heads": list(range(heads[0], heads[1] + 1)),
            "cells": [[[f"{float(v):.3g}", hex_of(rgb)] for v, rgb in zip(row, rgb_row, strict=True)]
                      for row, rgb_row in zip(values, colored, strict=True)],
            "lo": "0", "hi": f"{top:.3g}", "bar": [hex_of(rgb) for rgb in scale]}


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]{}#|~!])")


def as_text(value: str) -> str:
    """A string from a tokenizer, a model id or a user, made to show literally inside Markdown or HTML:
    no tag, entity, link or emphasis in it takes effect."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(str(value), quote=False))


def token_label(position: int, token: str) -> str:
    """How a token is listed in pickers and tables: its 0-based index and its text, quoted."""
    return f"{position}: {token!r}"


def analysis_note(sinks: np.ndarray, gallery_over: tuple[int, int] | None, shown: str = "") -> str:
    """The analysis view's note: what it was made for (`shown`: the token and ranges), the sink cells
    found, and why the gallery is empty when the ranges select more maps than allowed
    (gallery_over = (maps selected, maps allowed))."""
    cells = [list(map(int, cell)) for cell in np.argwhere(sinks)][:8]
    where = ", ".join(f"({row}, {col})" for row, col in cells) if cells else "none"
    note = (f"{shown}Sink cells (high attention from almost every generated token): {int(sinks.sum())} "
            f"(row, column: {where}); tick 'Mask sink cells' to hide them.")
    if gallery_over is not None:
        note += f" Gallery: narrow the ranges to at most {gallery_over[1]} layer × head maps (now {gallery_over[0]})."
    return note


def region_note(run: AttentionRun | None, cells: set, per_head: np.ndarray | None) -> str:
    """What the image → text view says about a region: the five heads that attend to it most
    (per_head: (L, H) mean share over tokens), or how to pick cells when there are none."""
    if not cells:
        return "Click the picture to pick token cells."
    order = np.argsort(per_head, axis=None)[::-1][:5]
    top = ", ".join(f"layer {run.layer_indices[i // per_head.shape[1]]} head {i % per_head.shape[1]} "
                    f"({per_head.flat[i]:.1%})" for i in order)
    return f"**{len(cells)} cells selected.** Heads that attend most to them (mean over tokens): {top}."


def verify_note(auc: dict[str, float]) -> str:
    """The faithfulness verdict: deletion and insertion AUCs of the map against a random order."""
    return (f"**Deletion AUC** (lower = the map finds what matters): map {auc['deletion']:.3f} vs random "
            f"{auc['random_deletion']:.3f} · **Insertion AUC** (higher is better): map {auc['insertion']:.3f} "
            f"vs random {auc['random_insertion']:.3f}. Cells are blurred at about one token's size.")
