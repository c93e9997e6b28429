"""Render one result: the picture and caption for a token and a view, and the views' helpers.

`render` turns a `StoredRun` (see `stored_run.py`) and a `ViewSettings` into a picture and a caption
stating what is drawn; the rest are the words, tables and small pictures the page shows beside it.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from attention_processor import (
    RAW_ATTENTION,
    image_shares,
    normalize_heatmap,
    prompt_token_heatmap,
)
from errors import InputError
from pictures.stored_run import (
    DISPLAY_NORMALIZATIONS,
    StoredRun,
    ViewSettings,
    layout_heatmap,
    method_index,
    method_set,
    raw_heatmap,
)
from pictures.view_parts import outline_target, target_scores, with_other_views, with_parts
from records import AttentionRun
from utils import scaled_size
from visualization import (
    DISPLAY_MAX_PIXELS,
    DISPLAY_MAX_SIDE,
    DIVERGING,
    SIDE_BY_SIDE_GAP,
    colorize,
    fit_within,
    heatmap_image,
    labelled,
    overlay,
    side_by_side,
    tiled,
    with_colorbar,
)

VIEWS: tuple[str, ...] = ("overlay", "side_by_side", "heatmap")


def render(stored: StoredRun, settings: ViewSettings) -> tuple[Image.Image, str]:
    """The picture for one token and its caption, stating exactly what is drawn."""
    run, s = stored.run, settings
    if s.view not in VIEWS:
        raise InputError(f"Unknown view {s.view!r}; choose one of {VIEWS}.")
    if not stored.is_single_image:
        return render_strip(stored, settings)
    heat = raw_heatmap(stored, s)  # (grid_h, grid_w)
    if s.contrasted:  # signed: one scale symmetric about 0, on the diverging colormap
        top = float(np.percentile(np.abs(heat), s.percentile)) if s.normalization == "percentile" else 0.0
        top = top or float(np.abs(heat).max()) or 1.0
        scale = (-top, top)
        unit = normalize_heatmap(heat, "fixed", value_range=scale)
        s = replace(s, colormap=DIVERGING)
    elif s.normalization == "shared" and len(s.tokens) == 1:
        scale = stored.shared_range(s)
        unit = normalize_heatmap(heat, "fixed", value_range=scale)
    elif s.normalization in ("minmax", "percentile", "shared"):  # several tokens: their own map's scale
        unit = normalize_heatmap(heat, "minmax" if s.normalization == "shared" else s.normalization, s.percentile)
        top = float(np.percentile(heat, s.percentile)) if s.normalization == "percentile" else float(heat.max())
        scale = (float(heat.min()), top)
    else:
        raise InputError(f"Unknown normalisation {s.normalization!r}; choose one of {DISPLAY_NORMALIZATIONS}.")
    shown, _ = stored.display(0)
    box = stored.display_box(0, run.vision.image_box_xyxy)
    draw = dict(colormap=s.colormap, interpolation=s.interpolation, value_range=(0.0, 1.0), grid=s.grid)
    if s.view == "heatmap":
        picture = heatmap_image(shown, unit, box, **draw)
    else:
        picture = overlay(shown, unit, box, alpha=s.alpha, **draw)
        if s.view == "side_by_side":
            picture = side_by_side(shown, picture)
    text = caption(stored, settings, heat)
    if s.target_box is not None:
        offsets = (0, shown.size[0] + SIDE_BY_SIDE_GAP) if s.view == "side_by_side" else (0,)
        picture = outline_target(picture, stored.display_box(0, s.target_box), offsets)
        text += " " + target_scores(stored, s, heat)
    if len(run.visions) > 1:  # one image, several views
        picture, text = with_other_views(stored, s, picture, text)
    if s.parts:
        picture, text = with_parts(stored, s, picture, text)
    return with_colorbar(picture, s.colormap, scale, colorbar_unit(s)), text


def colorbar_unit(s: ViewSettings) -> str:
    """What the colour bar's numbers measure, for these settings."""
    if s.contrasted:
        return "difference in share of the map (red: more than the other, blue: less)"
    if s.method != RAW_ATTENTION:
        return f"{s.method} map value"
    return "ratio to the generic prompt" if s.relative else "attention mass per cell"


def animation_frames(
    stored: StoredRun, settings: ViewSettings, max_side: int = 512, max_frames: int = 128
) -> Iterator[Image.Image]:
    """The map moving through the answer: one picture per generated token, in order, with the same
    settings for every frame (choose 'shared' normalisation to compare strengths across tokens), each
    with the token's index and text under it. Frames are at most `max_side` px on the longer side and
    all of one size; they are made one at a time. An answer longer than `max_frames` tokens is shown
    every k-th token (k the smallest that fits), and the first frame says so."""
    if not stored.is_single_image:
        raise InputError(
            "The animation follows the map over one image; this result has several images or "
            "a video. Generate from one image to animate it."
        )
    size = font = None
    stored.prepare_answer(settings)  # every frame's map in one pass
    small = replace(stored, display_max_side=max_side, _displays={})  # drawn at the frames' size; caches shared
    tokens = stored.run.generated_tokens
    every = max(1, -(-len(tokens) // max(1, max_frames)))  # ceil: at most max_frames frames
    for step_idx in range(0, len(tokens), every):
        token = tokens[step_idx]
        picture, _ = render(small, replace(settings, step_idx=step_idx, steps=(), prompt_pos=None))
        if size is None:
            factor = min(1.0, max_side / max(picture.size))
            size = scaled_size(picture.size, factor)
            font = ImageFont.load_default(size=max(12, size[0] // 28))
        strip = int(font.size * 1.8)
        frame = Image.new("RGB", (size[0], size[1] + strip), (255, 255, 255))
        frame.paste(picture.resize(size, Image.BILINEAR) if picture.size != size else picture, (0, 0))
        label = token_label(step_idx, token)
        if every > 1 and step_idx == 0:
            label += f"  ·  one frame per {every} tokens of {len(tokens)}"
        ImageDraw.Draw(frame).text((6, size[1] + strip // 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        yield frame


SCREEN_MIN_SIDE = 640  # px: pictures of smaller images are enlarged to about this on screen
SCREEN_MAX_ZOOM = 8  # a 1-px image is not blown up 640 times (its labels and colour bar would be too)


def screen_zoom(stored: StoredRun) -> int:
    """Whole-number factor by which a single image's pictures are enlarged on screen, so a small image
    is not shown postage-stamp size (at most SCREEN_MAX_ZOOM); 1 for large images and for several images
    or a video."""
    if not stored.is_single_image:
        return 1
    shown, _ = stored.display(0)
    return max(1, min(SCREEN_MAX_ZOOM, SCREEN_MIN_SIDE // max(shown.size)))


def on_screen(stored: StoredRun, picture: Image.Image) -> Image.Image:
    """The picture enlarged by `screen_zoom` with nearest-neighbour, so token cells keep sharp edges, and
    never past the display budget (a smaller zoom then). A click at (x, y) on it is at (x, y) / screen_zoom
    on the picture itself."""
    width, height = picture.size
    fits = min(DISPLAY_MAX_SIDE // max(width, height), math.isqrt(DISPLAY_MAX_PIXELS // max(1, width * height)))
    zoom = max(1, min(screen_zoom(stored), fits))
    return picture if zoom == 1 else picture.resize((width * zoom, height * zoom), Image.NEAREST)


def _panels(stored: StoredRun, s: ViewSettings) -> list[tuple[Image.Image, np.ndarray, tuple, str]]:
    """(image, raw map, box, label) per image of the prompt, or per frame of a video."""
    run, panels = stored.run, []
    shares = image_shares(run, s.step_idx, s.layers, s.heads) if s.prompt_pos is None else None
    for i, layout in enumerate(run.visions):
        heat = layout_heatmap(run, s, i)
        share = "" if shares is None else f" · {shares[i]:.0%} of the attention"
        if layout.num_frames == 1:
            image = layout.image_index
            name = f"image {image}" + (f" · {layout.view}" if layout.view else "")
            panels.append(
                (stored.display(image)[0], heat, stored.display_box(image, layout.image_box_xyxy), f"{name}{share}")
            )
        else:
            per = max(1, -(-len(run.frames) // layout.num_frames)) if run.frames else 1  # frames per token
            panels += [
                (
                    stored.display(f)[0],
                    heat[f],
                    stored.display_box(f, layout.image_box_xyxy),
                    _frames_label(f, per, len(run.frames)) + (share if f == 0 else ""),
                )
                for f in range(layout.num_frames)
            ]
    return panels


def _frames_label(step: int, per: int, total: int) -> str:
    """Which video frames one time step of tokens covers: with Qwen's temporal patch of 2, each token
    sees a pair of frames (the panel shows the first of them)."""
    if per == 1:
        return f"frame {step}"
    last = min(step * per + per - 1, total - 1) if total else step * per + per - 1
    return f"frames {step * per}–{last} (one token step)" if last > step * per else f"frame {step * per}"


STRIP_TILE_MAX_W, STRIP_ROW_MAX_W = 1280, 2560  # px: one panel of several images, and one row of them


def render_strip(stored: StoredRun, s: ViewSettings, height: int = 360) -> tuple[Image.Image, str]:
    """Several images (or a video's frames) side by side, each with its map on ONE shared scale."""
    if s.relative or s.mask_sinks or s.method != RAW_ATTENTION or s.contrasted:
        raise InputError(
            "'Relative to a generic prompt', 'Mask sink cells', contrasts and the maps other than raw "
            "attention work with a single image; untick them (method: attention) to compare several images "
            "or frames."
        )
    panels = _panels(stored, s)
    heats = np.concatenate([heat.ravel() for _, heat, _, _ in panels])
    lo, hi = (
        float(heats.min()),
        float(np.percentile(heats, s.percentile) if s.normalization == "percentile" else heats.max()),
    )
    draw = dict(colormap=s.colormap, interpolation=s.interpolation, value_range=(lo, hi), grid=s.grid)
    tiles = []
    for image, heat, box, label in panels:
        picture = (
            heatmap_image(image, heat, box, **draw)
            if s.view == "heatmap"
            else overlay(image, heat, box, alpha=s.alpha, **draw)
        )
        # `height` high, or less for a very wide image, so no panel passes STRIP_TILE_MAX_W
        scale = min(height / picture.size[1], STRIP_TILE_MAX_W / picture.size[0])
        tile = picture.resize(scaled_size(picture.size, scale), Image.BILINEAR)
        tiles.append(labelled(tile, label, font_px=max(12, height // 14)))
    strip = fit_within(tiled(tiles, STRIP_ROW_MAX_W))  # rows of panels, never one endless line
    strip = with_colorbar(strip, s.colormap, (lo, hi), "attention mass per cell, one scale for all")
    images = len({layout.image_index for layout in stored.run.visions})
    kind = (
        "time steps of the video"
        if stored.run.vision.num_frames > 1
        else "images"
        if len(panels) == images
        else f"views of {images} images"
    )
    who = tokens_text(stored.run, s) if s.prompt_pos is None else f"Prompt token {s.prompt_pos}"
    text = (
        f"{who} · layers {_range_text(s.layers)} · heads {_range_text(s.heads)} · {s.reduce} · "
        f"{len(panels)} {kind} on one scale (min–{'percentile' if s.normalization == 'percentile' else 'max'} "
        "over all of them), so their colours compare directly."
    )
    if s.target_box is not None:
        text += " The target box is scored and drawn for a single image only."
    video = stored.run.vision
    if video.num_frames > 1 and len(stored.run.frames) > video.num_frames:
        per = -(-len(stored.run.frames) // video.num_frames)
        text += (
            f" Each time step's tokens cover {per} consecutive frames (the model's temporal patch), so a map "
            f"belongs to the pair, not to one frame; each panel shows the first frame of its {per}."
        )
    return strip, text


def _range_text(bounds: tuple[int, int]) -> str:
    return f"{bounds[0]}" if bounds[0] == bounds[1] else f"{bounds[0]}–{bounds[1]}"


def tokens_text(run: AttentionRun, s: ViewSettings) -> str:
    """The generated token (or tokens, combined) a map is of, in words."""
    if len(s.tokens) == 1:
        return f"Token {s.step_idx} {as_text(repr(run.generated_tokens[s.step_idx]))}"
    pieces = " + ".join(as_text(repr(run.generated_tokens[t])) for t in s.tokens)
    return f"Tokens {', '.join(map(str, s.tokens))} {pieces} ({s.combine} of their maps)"


def caption(stored: StoredRun, s: ViewSettings, heat: np.ndarray) -> str:
    run = stored.run
    norm = {
        "minmax": "min–max of this map",
        "percentile": f"min to {s.percentile:g}th percentile (clipped)",
        "shared": "one scale shared by all tokens" if len(s.tokens) == 1 else "min–max of this map (several tokens)",
    }[s.normalization]
    if s.contrasted:
        norm = "one scale symmetric about 0 (white: no difference)"
    if s.prompt_pos is None:
        share = float(np.mean(stored.image_share(s.layers, s.heads, s.exclude_system)[list(s.tokens)]))
        who = tokens_text(run, s)
    else:
        share = float(prompt_token_heatmap(run, s.prompt_pos, s.layers, s.heads, "mean").sum())  # mean over heads
        piece = run.prompt_tokens[s.prompt_pos] if run.prompt_tokens else ""
        who = f"Prompt token {s.prompt_pos} {as_text(repr(piece))}"
    grid_h, grid_w = run.vision.grid_hw
    attending = run.layers_in(s.layers)  # Qwen3.5: only some layers have maps
    sparse = (
        ""
        if len(attending) == s.layers[1] - s.layers[0] + 1
        else f" (softmax attention only in {', '.join(map(str, attending))}; the others are linear, with no map)"
    )
    maps = len(attending) * (s.heads[1] - s.heads[0] + 1)
    what = (
        f"layers {_range_text(s.layers)}{sparse} · heads {_range_text(s.heads)} · {s.reduce} of {maps} maps"
        if s.method == RAW_ATTENTION
        else stored.method_captions.get(s.method, f"the {s.method} map")
    )
    notes = getattr(method_set(stored, s), "notes", None) if s.method != RAW_ATTENTION and len(s.tokens) == 1 else None
    if notes and (note := notes[method_index(stored, s)]):
        what += f" · {note}"
    text = (
        f"{who} · {what} · normalised: {norm} · "
        f"{grid_h}×{grid_w} token grid · {share:.0%} of this token's attention is on the image "
        f"(peak cell {heat.max():.3g})."
    )
    if s.contrast_step is not None:
        other = as_text(repr(run.generated_tokens[s.contrast_step]))
        text += (
            f" Contrast: this map minus token {s.contrast_step} {other}'s, each normalised to sum 1; red cells "
            "hold more of this token's map than of the other's, blue cells less."
        )
    elif s.contrast_prompt:
        text += (
            f" Contrast: this map minus the first answer token's map for the prompt "
            f"{as_text(repr(s.contrast_prompt))} on the same image, each normalised to sum 1; red cells hold "
            "more of this map, blue cells more of the other prompt's."
        )
    sinks = int(stored.sinks(s.layers, s.heads).sum()) if s.mask_sinks else 0
    options = [
        name
        for flag, name in (
            (s.renormalize, "renormalised within the image"),
            (s.mask_sinks, f"{sinks} sink cells masked"),
            (s.relative, "divided by the generic-prompt map"),
            (s.exclude_system, "shares without BOS and the system prompt"),
        )
        if flag
    ]
    if options:
        text += " Options: " + ", ".join(options) + "."
    query_pos = s.prompt_pos if s.prompt_pos is not None else len(run.prompt_ids) - 1 + s.step_idx
    if s.method == "attention" and (blind := run.out_of_window(s.layers, query_pos)):
        text += (
            f" Layers {', '.join(map(str, blind))} attend through a sliding window that no longer reaches "
            "the image from this token: their maps are truly zero, not hidden."
        )
    width, height = run.vision.image_size
    x0, y0, x1, y1 = run.vision.image_box_xyxy
    if (x0 > 0.5 or y0 > 0.5 or x1 < width - 0.5 or y1 < height - 0.5) and len(run.visions) > 1:
        text += (
            f" Hatched: parts of the image this {run.vision.view} map leaves out (its grid does not reach "
            "them); the other view beside it covers the whole image."
        )
    elif x0 > 0.5 or y0 > 0.5 or x1 < width - 0.5 or y1 < height - 0.5:
        text += " Hatched: parts of the image the model never saw (outside its crop)."
    return text


def step_labels(num_steps: int) -> list[str]:
    """Step numbers as zero-padded strings ("00", "01", ... "11"), so a bar plot shows one even bar
    per token on a categorical axis that sorts in step order."""
    width = len(str(max(num_steps - 1, 0)))
    return [str(t).zfill(width) for t in range(num_steps)]


def share_table(
    stored: StoredRun, layers: tuple[int, int], heads: tuple[int, int], step_idx: int, exclude_system: bool = False
) -> dict:
    """Columns for a plot of the attention share on the image, per generated token."""
    run = stored.run
    shares = stored.image_share(layers, heads, exclude_system)
    return {
        "step": step_labels(run.num_steps),
        "share": [float(v) for v in shares],
        "token": [f"{t}: {tok}" for t, tok in enumerate(run.generated_tokens)],
        "selected": ["selected" if t == step_idx else "other" for t in range(run.num_steps)],
    }


def matrix_view(values: np.ndarray, layers: list[int], heads: tuple[int, int], metric: str) -> dict:
    """The (l, h) values as the interactive heatmap draws them: one row per layer in `layers` (the
    captured layer indices of the rows), one column per head, 0-based labels, each cell's value and
    viridis colour on a scale from 0 to the largest value."""
    top = max(float(values.max()), 1e-6)
    unit = normalize_heatmap(values, "fixed", value_range=(0.0, top))  # (l, h) in 0..1
    colored = colorize(unit, (unit.shape[1], unit.shape[0]), "viridis", "nearest")  # (l, h, 3) RGB
    scale = colorize(np.linspace(0.0, 1.0, 11)[None, :], (11, 1), "viridis", "nearest")[0]  # (11, 3)

    def hex_of(rgb) -> str:
        return "#" + "".join(f"{int(c):02x}" for c in rgb)

    what = "attention share on the image" if metric == "share" else "spatial entropy of each head's map"
    return {
        "metric": metric,
        "title": f"{what}: rows = layers, columns = heads (0-based; click a cell)",
        "layers": list(layers),
        "heads": list(range(heads[0], heads[1] + 1)),
        "cells": [
            [[f"{float(v):.3g}", hex_of(rgb)] for v, rgb in zip(row, rgb_row, strict=True)]
            for row, rgb_row in zip(values, colored, strict=True)
        ],
        "lo": "0",
        "hi": f"{top:.3g}",
        "bar": [hex_of(rgb) for rgb in scale],
    }


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]{}#|~!])")


# What a Markdown renderer turns into a link by itself (GFM autolinks): a word joiner inside stops it.
_AUTOLINKS = re.compile(r"(?<=:)(?=//)|(?<=www)(?=\.)|(?<=@)(?=\w)", re.IGNORECASE)
WORD_JOINER = "\u2060"


def as_text(value: str) -> str:
    """A string from a tokenizer, a model id or a user, made to show literally inside Markdown or HTML:
    no tag, entity, link or emphasis in it takes effect (a URL or an address stays text, not a link)."""
    escaped = _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(str(value), quote=False))
    return _AUTOLINKS.sub(WORD_JOINER, escaped)


def plain_text(shown: str) -> str:
    """What `as_text` made literal for Markdown, back as the plain text it stands for (for a page or a
    notebook that escapes for itself)."""
    return html.unescape(re.sub(r"\\([\\`*_\[\]{}#|~!])", r"\1", shown)).replace(WORD_JOINER, "")


def answer_words(tokens: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """The answer's words as (text, the generated tokens that spell it): a token that starts with a space,
    or follows one that ends with a space or is not a letter or digit, starts a new word; tokens with no
    letter or digit (punctuation, spaces) belong to no word."""
    words: list[tuple[str, list[int]]] = []
    joined = False  # whether the next token may continue the last word
    for t, token in enumerate(tokens):
        wordy = any(ch.isalnum() for ch in token)
        if wordy and joined and not token[:1].isspace():
            words[-1][1].append(t)
        elif wordy:
            words.append((token, [t]))
        joined = wordy and not token[-1:].isspace()
    return [("".join(tokens[t] for t in steps).strip(), tuple(steps)) for _, steps in words]


def token_label(position: int, token: str) -> str:
    """How a token is listed in pickers and tables: its 0-based index and its text, quoted."""
    return f"{position}: {token!r}"


def analysis_note(sinks: np.ndarray, gallery_over: tuple[int, int] | None, shown: str = "") -> str:
    """The analysis view's note: what it was made for (`shown`: the token and ranges), the sink cells
    found, and why the gallery is empty when the ranges select more maps than allowed
    (gallery_over = (maps selected, maps allowed))."""
    cells = [list(map(int, cell)) for cell in np.argwhere(sinks)][:8]
    where = ", ".join(f"({row}, {col})" for row, col in cells) if cells else "none"
    note = (
        f"{shown}Sink cells (high attention from almost every generated token): {int(sinks.sum())} "
        f"(row, column: {where}); tick 'Mask sink cells' to hide them."
    )
    if gallery_over is not None:
        note += f" Gallery: narrow the ranges to at most {gallery_over[1]} layer × head maps (now {gallery_over[0]})."
    return note


def region_note(run: AttentionRun | None, cells: set, per_head: np.ndarray | None) -> str:
    """What the image → text view says about a region: the five heads that attend to it most
    (per_head: (L, H) mean share over tokens), or how to pick cells when there are none."""
    if not cells:
        return "Tick 'Clicks pick region cells' under the map, then click the picture to pick token cells."
    order = np.argsort(per_head, axis=None)[::-1][:5]
    top = ", ".join(
        f"layer {run.layer_indices[i // per_head.shape[1]]} head {i % per_head.shape[1]} ({per_head.flat[i]:.1%})"
        for i in order
    )
    picked = f"{len(cells)} cell{'' if len(cells) == 1 else 's'}"
    return f"**{picked} selected.** Heads that attend most to them (mean over tokens): {top}."


def verify_note(auc: dict[str, float]) -> str:
    """The faithfulness verdict: deletion and insertion AUCs of the map against a random order."""
    return (
        f"**Deletion AUC** (lower = the map finds what matters): map {auc['deletion']:.3f} vs random "
        f"{auc['random_deletion']:.3f} · **Insertion AUC** (higher is better): map {auc['insertion']:.3f} "
        f"vs random {auc['random_insertion']:.3f}. Cells are blurred at about one token's size."
    )
