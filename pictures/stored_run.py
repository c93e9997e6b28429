"""One result as the app keeps it: a run with the pictures its maps are drawn on and the caches that
make re-rendering fast (`StoredRun`), the settings that decide one picture (`ViewSettings`), and the
map those settings select (`raw_heatmap`), before any display scaling or drawing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from analysis import relative_heatmap, sink_cells
from attention_processor import (
    RAW_ATTENTION,
    heatmap_range,
    prompt_token_heatmap,
    range_slice,
    token_heatmap,
    vision_share,
)
from errors import InputError, NotReadyError
from records import AttentionRun
from utils import scale_box, scaled_size


def method_key(s: ViewSettings, uses_ranges: bool):
    """Cache key of a method's maps: a method that starts from the raw map (the ViT map) also depends on
    the raw map's settings."""
    return (s.method, s.layers, s.heads, s.reduce, s.renormalize) if uses_ranges else (s.method,)


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
    shares: np.ndarray = field(default=None)  # (T, L, H), from vision_share
    baseline: AttentionRun | None = None  # same image, generic prompt
    method_maps: dict = field(default_factory=dict)  # method_key -> [(grid_h, grid_w)] per step
    method_captions: dict = field(default_factory=dict)  # method -> what its caption says it draws
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
        self.system_shares = self.run.segment_shares("system")  # (T, L, H): BOS, system prompt, header

    def display(self, index: int = 0) -> tuple[Image.Image, tuple[float, float]]:
        """Image `index` as drawn: a copy at most `display_max_side` px on its longer side, and its
        scale (display px per original px, x and y). Original-pixel boxes are multiplied by it."""
        if index not in self._displays:
            image = self.images[index]
            factor = min(1.0, self.display_max_side / max(image.size))
            shown = image if factor == 1.0 else image.resize(scaled_size(image.size, factor), Image.BILINEAR)
            self._displays[index] = (shown, (shown.size[0] / image.size[0], shown.size[1] / image.size[1]))
        return self._displays[index]

    def display_box(self, index: int, box_xyxy) -> tuple[float, float, float, float]:
        """A box in original pixels of image `index`, in the pixels of its display copy."""
        _, (sx, sy) = self.display(index)
        return scale_box(box_xyxy, sx, sy)

    def image_share(self, layers, heads, exclude_system: bool = False) -> np.ndarray:
        """(T,) mean share of each token's attention on the image(s), over the selected layers and heads;
        with exclude_system, measured among the tokens after the system prompt."""
        layer_sel = range_slice(layers, self.run.layer_indices, "layer")
        shares = self.shares[:, layer_sel, heads[0] : heads[1] + 1]  # (T, l, h)
        if exclude_system:
            rest = 1.0 - self.system_shares[:, layer_sel, heads[0] : heads[1] + 1]
            shares = shares / np.clip(rest, 1e-12, None)
        return shares.mean(axis=(1, 2))

    @property
    def image(self) -> Image.Image:
        """The first picture (the one most views draw on)."""
        return self.images[0]

    @property
    def is_single_image(self) -> bool:
        """One still image (perhaps seen in several views, such as tiles and a global view)."""
        return all(layout.image_index == 0 and layout.num_frames == 1 for layout in self.run.visions)

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
        key = replace(
            settings, step_idx=0, prompt_pos=None, normalization="", colormap="", alpha=0.0, view="", grid=False
        )  # over the generated tokens
        if key not in self._ranges:
            self._ranges[key] = heatmap_range(
                [raw_heatmap(self, replace(key, step_idx=t)) for t in range(self.run.num_steps)]
            )
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
    normalization: str = "minmax"  # minmax | percentile | shared
    percentile: float = 99.0
    colormap: str = "jet"
    alpha: float = 0.5
    view: str = "overlay"  # overlay | side_by_side | heatmap
    grid: bool = False
    renormalize: bool = False  # each head's image attention rescaled to sum to 1
    mask_sinks: bool = False  # sink cells set to the map's floor
    relative: bool = False  # divided by the generic-prompt map of the same image
    method: str = "attention"  # attention | rollout | gradient
    exclude_system: bool = False  # shares measured without BOS and the system prompt
    prompt_pos: int | None = None  # show this prompt token's map instead of step_idx's
    interpolation: str = "bilinear"
    target_box: tuple[float, float, float, float] | None = None  # ground truth (x0, y0, x1, y1), original px

    @property
    def num_maps(self) -> int:
        """How many (layer, head) maps the ranges select."""
        return (self.layers[1] - self.layers[0] + 1) * (self.heads[1] - self.heads[0] + 1)


def layout_heatmap(run, s: ViewSettings, image_idx: int = 0) -> np.ndarray:
    """The raw attention map of the selected token (generated, or the picked prompt token) on layout
    `image_idx` of `run.visions`, over the settings' layer and head ranges."""
    if s.prompt_pos is not None:
        return prompt_token_heatmap(run, s.prompt_pos, s.layers, s.heads, s.reduce, s.renormalize, image_idx)
    return token_heatmap(run, s.step_idx, s.layers, s.heads, s.reduce, s.renormalize, image_idx)


def raw_heatmap(stored: StoredRun, s: ViewSettings) -> np.ndarray:
    """(grid_h, grid_w) float32 before display scaling, with the sink and baseline options applied."""
    if s.method != RAW_ATTENTION:
        return method_heatmap(stored, s)
    heat = layout_heatmap(stored.run, s)
    if s.relative:
        if stored.baseline is None:
            raise NotReadyError(
                "The generic-prompt baseline for this image is not computed yet. "
                "Tick 'Relative to a generic prompt' again to compute it."
            )
        heat = relative_heatmap(heat, token_heatmap(stored.baseline, 0, s.layers, s.heads, s.reduce, s.renormalize))
    return _masked_sinks(stored, s, heat)


def _masked_sinks(stored: StoredRun, s: ViewSettings, heat: np.ndarray) -> np.ndarray:
    """With `mask_sinks`, the sink cells of these ranges set to the floor of the other cells."""
    if s.mask_sinks:
        sinks = stored.sinks(s.layers, s.heads)
        if sinks.any() and not sinks.all():
            heat = np.where(sinks, heat[~sinks].min(), heat).astype(np.float32)
    return heat


def method_heatmap(stored: StoredRun, s: ViewSettings) -> np.ndarray:
    """A map of another method (rollout, gradient, ViT, …), computed beforehand for every generated token."""
    if s.prompt_pos is not None or s.relative:
        raise InputError(
            f"The {s.method} map is for generated tokens, without the generic-prompt division; "
            "pick a generated token and untick 'Relative to a generic prompt'."
        )
    maps = stored.method_maps.get(method_key(s, False), stored.method_maps.get(method_key(s, True)))
    if maps is None:
        raise NotReadyError(
            f"The {s.method} maps for these settings are not computed yet; select the method again to compute them."
        )
    heat = maps[s.step_idx]
    if s.mask_sinks and heat.shape != tuple(stored.run.vision.grid_hw):
        raise InputError(f"Sink cells are token cells; untick 'Mask sink cells' for the patch-level {s.method} map.")
    return _masked_sinks(stored, s, heat)
