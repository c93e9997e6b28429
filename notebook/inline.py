"""One token's map as Jupyter shows it: `show(run, ...)` returns an `InlineMap` that renders inline as the
picture with its caption (`_repr_html_`, `_repr_png_`), and that can be saved.

A run's pictures and caches (`pictures.stored_run.StoredRun`) are kept while the run lives, so a second
`show` of the same run reuses its maps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from attention_processor import RAW_ATTENTION
from errors import InputError
from methods import method
from pictures.report import inline_figure, png_bytes
from pictures.stored_run import StoredRun, ViewSettings
from pictures.views import plain_text, render
from pipeline import ModelSlot, method_maps
from records import AttentionRun

_STORED: dict[int, StoredRun] = {}  # id(run) -> its StoredRun, dropped when the run is collected


def stored_run(run: AttentionRun) -> StoredRun:
    """The run with the pictures its maps are drawn on (its images, or one frame per time step of a video),
    made once per run."""
    key = id(run)
    if key not in _STORED:
        if run.images:
            pictures = list(run.images)
        elif run.frames:
            per = max(1, len(run.frames) // max(1, run.vision.num_frames))
            pictures = list(run.frames[::per])[: run.vision.num_frames]
        else:
            raise InputError("This run keeps no image to draw on; make it with ModelHolder.generate.")
        _STORED[key] = StoredRun(run, images=pictures)
        weakref.finalize(run, _STORED.pop, key, None)
    return _STORED[key]


def view_settings(
    run: AttentionRun, step_idx: int = 0, layers=None, heads=None, method_name: str = RAW_ATTENTION, **view
) -> ViewSettings:
    """The settings of one picture: ranges default to every captured layer and head; `view` takes any other
    `ViewSettings` field (reduce, normalization, colormap, alpha, view, grid, steps, contrast_step, …)."""
    if run.num_steps == 0:
        raise InputError("This run generated no tokens, so there is no map to show. Generate again.")
    if not 0 <= int(step_idx) < run.num_steps:
        raise InputError(f"step_idx {step_idx} is out of range: this run has tokens 0..{run.num_steps - 1}.")
    known = set(ViewSettings.__dataclass_fields__)
    unknown = sorted(set(view) - known)
    if unknown:
        raise InputError(f"Unknown view setting(s) {unknown}; known ones are {sorted(known)}.")
    layers = tuple(layers) if layers is not None else (run.layer_indices[0], run.layer_indices[-1])
    heads = tuple(heads) if heads is not None else (0, run.num_heads - 1)
    if "steps" in view:
        view["steps"] = tuple(int(t) for t in view["steps"])
    return ViewSettings(step_idx=int(step_idx), layers=layers, heads=heads, method=method_name, **view)


def picture_of(run: AttentionRun, s: ViewSettings, holder=None) -> tuple[Image.Image, str]:
    """(picture, plain-text caption) for these settings; a method that replays the model needs `holder`
    (the ModelHolder that made the run)."""
    stored = stored_run(run)
    entry = method(s.method)
    if s.method != RAW_ATTENTION:
        if entry.needs_model and holder is None:
            raise InputError(f"The {s.method} map replays the model: pass holder= (the ModelHolder that made the run).")
        slot = ModelSlot()
        slot.holder = holder
        method_maps(slot, stored, s)
    picture, caption = render(stored, s)
    return picture, plain_text(caption)


@dataclass
class InlineMap:
    """A map as a notebook shows it: the picture and the caption that says exactly what it draws."""

    picture: Image.Image
    caption: str
    settings: ViewSettings

    def _repr_png_(self) -> bytes:
        return png_bytes(self.picture)

    def _repr_html_(self) -> str:
        return inline_figure(self.picture, self.caption, "attention map")

    def __repr__(self) -> str:
        return f"InlineMap({self.picture.size[0]}×{self.picture.size[1]} px: {self.caption})"

    def save(self, path: str | Path) -> Path:
        """Write the picture (PNG, JPEG, … by the suffix), creating the folder; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.picture.save(path)
        return path


def show(
    run: AttentionRun,
    step_idx: int = 0,
    layers=None,
    heads=None,
    method: str = RAW_ATTENTION,
    holder=None,
    max_side: int = 1024,
    **view,
) -> InlineMap:
    """Generated token `step_idx`'s map over the image, as an object Jupyter renders inline with its caption.

    layers, heads: 0-based inclusive ranges (default: every captured one). method: any map method of
    `methods.METHODS`; those that replay the model need `holder`. max_side bounds the picture's longer side.
    Other keywords are `ViewSettings` fields (reduce="max", normalization="percentile", view="side_by_side",
    steps=(2, 3) to combine tokens, contrast_step=…)."""
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16:
        raise InputError(
            f"max_side is the picture's longer side in pixels, a whole number of at least 16, got {max_side!r}."
        )
    settings = view_settings(run, step_idx, layers, heads, method, **view)
    picture, caption = picture_of(run, settings, holder)
    if max(picture.size) > max_side:
        picture = picture.copy()
        picture.thumbnail((max_side, max_side))
    return InlineMap(picture, caption, settings)
