"""One result as the app keeps it: a run with the pictures its maps are drawn on and the caches that
make re-rendering fast (`StoredRun`), the settings that decide one picture (`ViewSettings`), and the
map those settings select (`raw_heatmap`), before any display scaling or drawing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from analysis import contrast_heatmap, relative_heatmap, sink_cells
from attention_processor import (
    RAW_ATTENTION,
    combine_maps,
    heatmap_range,
    prompt_token_heatmap,
    range_slice,
    token_heatmap,
    token_heatmaps,
    vision_share,
)
from errors import InputError, NotReadyError
from records import AttentionRun
from utils import scale_box, scaled_size


def method_key(s: ViewSettings, uses_ranges: bool):
    """Cache key of a method's maps: a method that starts from the raw map (the ViT map) also depends on
    the raw map's settings. The maps of prompt tokens are kept apart from those of generated tokens."""
    key = (s.method, s.layers, s.heads, s.reduce, s.renormalize) if uses_ranges else (s.method,)
    return (*key, "prompt") if s.prompt_pos is not None else key


DISPLAY_NORMALIZATIONS: tuple[str, ...] = ("minmax", "percentile", "shared")
MAP_SETTINGS_KEPT = 8  # layer/head range settings whose per-token raw maps a result keeps


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
    contrasts: dict = field(default_factory=dict)  # another prompt -> its run on the same image (one token)
    method_maps: dict = field(default_factory=dict)  # method_key -> [(grid_h, grid_w)] per step
    method_captions: dict = field(default_factory=dict)  # method -> what its caption says it draws
    display_max_side: int = 2048
    _ranges: dict = field(default_factory=dict)
    _maps: OrderedDict = field(default_factory=OrderedDict)  # map settings -> {step: raw attention map}
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
        baseline += sum(other.nbytes for other in self.contrasts.values())
        maps = sum(heat.nbytes for kept in self._maps.values() for heat in kept.values())
        methods = sum(
            heat.nbytes
            for maps in self.method_maps.values()
            for kept in (maps, *getattr(maps, "parts", {}).values())  # the maps and what they were built from
            for heat in kept
            if heat is not None  # a per-token method's tokens not shown yet
        )
        return self.run.nbytes + pixels + self.shares.nbytes + baseline + methods + maps

    def attention_map(self, s: ViewSettings, image_idx: int = 0) -> np.ndarray:
        """Generated token `s.step_idx`'s raw attention map for the settings' ranges, cached with the other
        tokens' maps of the same ranges (`prepare_maps` fills many at once)."""
        return self.prepare_maps(s, [s.step_idx], image_idx)[s.step_idx]

    def prepare_maps(self, s: ViewSettings, steps, image_idx: int = 0) -> dict[int, np.ndarray]:
        """The raw attention maps of generated tokens `steps` for the settings' ranges, those not kept yet
        computed together (one pass per layer of the store; `attention_processor.token_heatmaps`). The maps
        of the last `MAP_SETTINGS_KEPT` range settings are kept: a few KB per token each."""
        key = (tuple(s.layers), tuple(s.heads), s.reduce, s.renormalize, image_idx)
        maps = self._maps.setdefault(key, {})
        self._maps.move_to_end(key)
        while len(self._maps) > MAP_SETTINGS_KEPT:
            self._maps.popitem(last=False)
        missing = sorted({int(t) for t in steps} - set(maps))
        if missing:
            made = token_heatmaps(self.run, missing, s.layers, s.heads, s.reduce, s.renormalize, image_idx)
            maps.update(zip(missing, made, strict=True))
        return maps

    def prepare_answer(self, s: ViewSettings) -> None:
        """Every generated token's map for these settings at once, where they are raw attention (before an
        animation or a shared scale, which need them all)."""
        if s.method == RAW_ATTENTION:
            self.prepare_maps(s, range(self.run.num_steps))

    def shared_range(self, settings: ViewSettings) -> tuple[float, float]:
        """(min, max) over every token's map for these settings, cached."""
        key = replace(
            settings.one_token(0), normalization="", colormap="", alpha=0.0, view="", grid=False
        )  # over the generated tokens, each on its own
        if key not in self._ranges:
            self.prepare_answer(key)
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
    steps: tuple[int, ...] = ()  # several generated tokens (a word, a phrase): their maps combined
    combine: str = "sum"  # how: sum | mean | max (attention_processor.COMBINES)
    contrast_step: int | None = None  # minus this generated token's map (each normalised to sum 1)
    contrast_prompt: str = ""  # minus the map of this prompt on the same image (its first token)
    parts: bool = False  # also draw what the method built its map from (TAM: raw logit, interference)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The generated tokens the map is of: `steps` when several are picked, else `step_idx`."""
        return self.steps or (self.step_idx,)

    @property
    def combined(self) -> bool:
        """Several generated tokens' maps are combined into the one drawn (a prompt token takes precedence)."""
        return len(self.steps) > 1 and self.prompt_pos is None

    def one_token(self, step_idx: int) -> ViewSettings:
        """These settings for generated token `step_idx`'s own map: no other token combined with it, no
        prompt token, no contrast."""
        return replace(self, step_idx=step_idx, steps=(), prompt_pos=None, contrast_step=None, contrast_prompt="")

    @property
    def contrasted(self) -> bool:
        """The map is a signed difference (another token's or another prompt's map subtracted)."""
        return self.contrast_step is not None or bool(self.contrast_prompt)

    @property
    def num_maps(self) -> int:
        """How many (layer, head) maps the ranges select."""
        return (self.layers[1] - self.layers[0] + 1) * (self.heads[1] - self.heads[0] + 1)


def layout_heatmap(run, s: ViewSettings, image_idx: int = 0) -> np.ndarray:
    """The raw attention map of the selected token (generated, the picked prompt token, or several
    generated tokens combined) on layout `image_idx` of `run.visions`, over the settings' ranges."""
    if s.prompt_pos is not None:
        return prompt_token_heatmap(run, s.prompt_pos, s.layers, s.heads, s.reduce, s.renormalize, image_idx)
    steps = list(s.steps) if s.combined else s.step_idx
    return token_heatmap(run, steps, s.layers, s.heads, s.reduce, s.renormalize, image_idx, s.combine)


def raw_heatmap(stored: StoredRun, s: ViewSettings) -> np.ndarray:
    """(grid_h, grid_w) float32 before display scaling: the selected token's map (or several tokens'
    maps combined), with the sink and baseline options applied, and with a contrast the signed
    difference from the other token's or prompt's map (`analysis.contrast_heatmap`)."""
    if s.contrast_step is not None and s.contrast_prompt:
        raise InputError("Contrast with another token or with another prompt, not both: clear one of them.")
    if s.combined:
        if s.method == RAW_ATTENTION and s.prompt_pos is None:
            stored.prepare_maps(s, s.steps)  # together, in one pass
        heat = combine_maps([token_map(stored, s.one_token(t)) for t in s.steps], s.combine)
    else:
        heat = token_map(stored, replace(s, steps=()))
    if s.contrast_step is not None:
        if not 0 <= s.contrast_step < stored.run.num_steps:
            raise InputError(
                f"Contrast token {s.contrast_step} is not in this answer (tokens 0..{stored.run.num_steps - 1})."
            )
        other = token_map(stored, s.one_token(s.contrast_step))
        return contrast_heatmap(heat, other)
    if s.contrast_prompt:
        if s.method != RAW_ATTENTION:
            raise InputError(
                f"The contrast with another prompt compares raw attention; pick the attention map (not {s.method}), "
                "or contrast with another token of the answer."
            )
        other_run = stored.contrasts.get(s.contrast_prompt)
        if other_run is None:
            raise NotReadyError(
                "The map of the other prompt is not computed yet; press Enter in 'Contrast with another prompt'."
            )
        return contrast_heatmap(heat, token_heatmap(other_run, 0, s.layers, s.heads, s.reduce, s.renormalize))
    return heat


def token_map(stored: StoredRun, s: ViewSettings) -> np.ndarray:
    """One token's map (generated `step_idx`, or `prompt_pos`) by the settings' method, with the sink and
    generic-prompt options applied."""
    if s.method != RAW_ATTENTION:
        return method_heatmap(stored, s)
    heat = layout_heatmap(stored.run, s) if s.prompt_pos is not None else stored.attention_map(s)
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


def method_set(stored: StoredRun, s: ViewSettings):
    """The computed maps of `s.method` for these settings (one per generated token, or per prompt
    position of `run.prompt_positions` when a prompt token is picked), or None when not computed yet."""
    return stored.method_maps.get(method_key(s, False), stored.method_maps.get(method_key(s, True)))


def method_index(stored: StoredRun, s: ViewSettings) -> int:
    """Which of `method_set`'s maps is the selected token's."""
    if s.prompt_pos is None:
        return s.step_idx
    if s.prompt_pos not in stored.run.prompt_positions:
        raise InputError(f"Prompt token {s.prompt_pos} has no map; pick one of the prompt tokens listed.")
    return stored.run.prompt_positions.index(s.prompt_pos)


def method_heatmap(stored: StoredRun, s: ViewSettings) -> np.ndarray:
    """A map of another method (rollout, gradient, ViT, TAM, …), computed beforehand for every generated
    token (and, for the methods that map them, every listed prompt token)."""
    if s.relative:
        raise InputError(
            f"The {s.method} map is drawn without the generic-prompt division; untick 'Relative to a generic prompt'."
        )
    maps = method_set(stored, s)
    if maps is None:
        raise NotReadyError(
            f"The {s.method} maps for these settings are not computed yet; select the method again to compute them."
        )
    heat = maps[method_index(stored, s)]
    if heat is None:  # a method computed per token, for the tokens shown so far
        raise NotReadyError(
            f"The {s.method} map of token {s.step_idx} is not computed yet: this method is computed for each "
            "token shown (pick the token to compute it). The shared scale and the animation need every "
            "token's map: use min–max or percentile, or another method, for those."
        )
    if s.mask_sinks and heat.shape != tuple(stored.run.vision.grid_hw):
        raise InputError(f"Sink cells are token cells; untick 'Mask sink cells' for the patch-level {s.method} map.")
    return _masked_sinks(stored, s, heat)
