"""The records that cross module boundaries: where an image's tokens sit (`VisionLayout`, with its
grid geometry), how a run was made (`GenerationSettings`) and what it captured (`AttentionRun`).

The ground floor: drawing, reports and analysis read these. Importing it has no side effects; it
imports no capture, model, pipeline or UI module, only the pure store math of `attention_store`.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from attention_store import QueryKeyStore, RowStore
from errors import InputError, OutOfRangeError


def cell_edges(grid_hw: tuple[int, int], box_xyxy) -> tuple[np.ndarray, np.ndarray]:
    """Borders of a (grid_h, grid_w) grid spread evenly over a box: xs (grid_w + 1,), ys (grid_h + 1,), float64."""
    grid_h, grid_w = int(grid_hw[0]), int(grid_hw[1])
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    return x0 + (x1 - x0) * np.arange(grid_w + 1) / grid_w, y0 + (y1 - y0) * np.arange(grid_h + 1) / grid_h


@dataclass(frozen=True)
class VisionLayout:
    """Where the image's tokens sit in the sequence and on the picture.

    token_positions: (n_cells,) int64, 0-based positions in the full sequence (prompt + generated)
        of the vision tokens, in grid order: entry j is grid cell (j // grid_w, j % grid_w).
    grid_hw: (grid_h, grid_w), the vision-token grid, row-major as the model sees it.
    image_size: (W, H) of the original (upright) image, in pixels.
    image_box_xyxy: (x0, y0, x1, y1) in pixels of the ORIGINAL image: the region the grid covers.
        The whole image for Qwen (resize without crop); the centre crop for LLaVA-1.5. It may
        extend past the image when the processor pads (LLaVA with do_pad).
    processed_hw: (H, W) of the pixel tensor the vision encoder received.
    num_frames: 1 for an image; for a video, the temporal grid size t. Then token_positions holds
        num_frames * grid_h * grid_w entries, frame-major: entry j is frame j // (grid_h * grid_w).
    image_index: which image of the prompt this layout maps (0-based). One image may have several
        views, each its own layout: the high-resolution tiles stitched over the image, and a global view
        or thumbnail of the whole image (LLaVA-NeXT, LLaVA-OneVision, InternVL, Idefics3).
    view: the view's name ("" for a family with one view per image), e.g. "tiles" or "global view".
        Separator and row-break tokens among an image's tokens (newlines, tile markers) are in no view.

    Cell ↔ pixel geometry lives in the methods below and nowhere else: the grid spreads evenly
    over `image_box_xyxy`, cell (row, col) spans [xs[col], xs[col + 1]) × [ys[row], ys[row + 1]).
    """

    token_positions: np.ndarray
    grid_hw: tuple[int, int]
    image_size: tuple[int, int]
    image_box_xyxy: tuple[float, float, float, float]
    processed_hw: tuple[int, int]
    num_frames: int = 1
    image_index: int = 0
    view: str = ""

    @property
    def num_cells(self) -> int:
        """Cells per frame: grid_h * grid_w."""
        return self.grid_hw[0] * self.grid_hw[1]

    def cell_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """xs (grid_w + 1,), ys (grid_h + 1,): the cell borders in original-image pixels."""
        return cell_edges(self.grid_hw, self.image_box_xyxy)

    def cell_box_xyxy(self, row: int, col: int) -> tuple[float, float, float, float]:
        """The rectangle of cell (row, col) in original-image pixels."""
        xs, ys = self.cell_edges()
        return float(xs[col]), float(ys[row]), float(xs[col + 1]), float(ys[row + 1])

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(row, col) of the cell under original-image pixel (x, y), or None outside the grid's box."""
        xs, ys = self.cell_edges()
        if not (xs[0] <= x < xs[-1] and ys[0] <= y < ys[-1]):
            return None
        return int(np.searchsorted(ys, y, side="right") - 1), int(np.searchsorted(xs, x, side="right") - 1)

    def cells_in_box(self, box_xyxy) -> np.ndarray:
        """(grid_h, grid_w) bool: the cells whose centres fall inside a box in original-image pixels."""
        xs, ys = self.cell_edges()
        cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2  # (grid_w,), (grid_h,) centres
        bx0, by0, bx1, by1 = box_xyxy
        return ((cy[:, None] >= by0) & (cy[:, None] <= by1)) & ((cx[None, :] >= bx0) & (cx[None, :] <= bx1))

    def cells_overlapping(self, box_xyxy) -> np.ndarray:
        """(grid_h, grid_w) bool: the cells whose rectangles share some area with a box in original-image
        pixels (a cell that only touches the box's border does not)."""
        xs, ys = self.cell_edges()
        bx0, by0, bx1, by1 = (float(v) for v in box_xyxy)
        rows = (ys[:-1] < by1) & (ys[1:] > by0)  # (grid_h,)
        cols = (xs[:-1] < bx1) & (xs[1:] > bx0)  # (grid_w,)
        return rows[:, None] & cols[None, :]

    def cell_slices(self) -> list[tuple[slice, slice]]:
        """Pixel rows and columns of the original image under each cell (row-major), rounded and
        clipped to the image; a cell wholly outside it gets empty slices."""
        xs, ys = self.cell_edges()
        xs = np.clip(np.round(xs), 0, self.image_size[0]).astype(int)
        ys = np.clip(np.round(ys), 0, self.image_size[1]).astype(int)
        grid_h, grid_w = self.grid_hw
        return [(slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1])) for r in range(grid_h) for c in range(grid_w)]

    def to_dict(self) -> dict:
        return {
            "token_positions": self.token_positions.tolist(),
            "grid_hw": list(self.grid_hw),
            "image_size": list(self.image_size),
            "image_box_xyxy": list(self.image_box_xyxy),
            "processed_hw": list(self.processed_hw),
            "num_frames": self.num_frames,
            "image_index": self.image_index,
            "view": self.view,
        }


@dataclass(frozen=True)
class GenerationSettings:
    """How a run was made, enough to rebuild its inputs: the prompt, the image-token budget
    (Qwen's min/max pixels; None = the processor's default) and the decoding options."""

    prompt: str = ""
    max_new_tokens: int = 0
    method: str = "sdpa"
    min_pixels: int | None = None
    max_pixels: int | None = None
    store: str = "auto"
    decoding: dict = field(default_factory=dict)  # scalar generate() options

    def to_dict(self) -> dict:
        return asdict(self)


def segment_positions(visions: list[VisionLayout]) -> dict[str, np.ndarray]:
    """Key positions whose per-step attention mass a run keeps: 'vision' (every image token) and
    'system' (everything before the first image: BOS, system prompt, chat header). int64 arrays."""
    vision = np.concatenate([layout.token_positions for layout in visions]).astype(np.int64)
    return {"vision": vision, "system": np.arange(int(vision.min()), dtype=np.int64)}


@dataclass
class AttentionRun:
    """One generation: its tokens, the image's vision layout and the captured attention.

    All indices are 0-based. Everything is detached and on the CPU.

    prompt_ids: the prompt's token ids, vision placeholders expanded (len = prompt_len).
    generated_ids: the ids the model generated, in order; step_idx t is generated_ids[t].
    generated_tokens: one decoded piece per generated id.
    vision: where the image's tokens sit in the sequence and on the picture (the first image's main
        view: its stitched high-resolution tiles where the family has several views).
    layer_indices: the decoder layers captured, in order; axis 0 of `step_attention`.
    num_heads: query heads per layer; axis 1 of `step_attention`.
    attention: the captured attention, a `RowStore` or `QueryKeyStore` (see `attention_store`);
        a list of per-step float16 rows (num_layers, num_heads, prompt_len + t) is wrapped in a
        RowStore. Read it through `step_attention`, `prompt_attention` and `segment_shares`.
    model_id, family, settings: provenance for exports, captions and replays.
    prompt_positions: prompt positions (text, not vision) whose rows were also captured at prefill.
    prompt_tokens: one decoded piece per prompt id (empty when not provided).
    visions: one layout per view of each image (or the one video), images in prompt order, each
        image's main view first; visions[0] is `vision`. `layout.image_index` names its image.
    images: the upright RGB images the model saw, in prompt order (empty for a video): replays of
        the run (`ModelHolder.replay_inputs`) and the pictures use these, so nothing reloads them.
    frames: the video frames the model saw (empty for images).
    windows: per captured layer (as `layer_indices`), the sliding-window length of its attention, or
        None for full attention; a query then sees only the last `window` keys, itself included.
    """

    prompt_ids: list[int]
    generated_ids: list[int]
    generated_tokens: list[str]
    vision: VisionLayout
    layer_indices: list[int]
    num_heads: int
    attention: RowStore | QueryKeyStore | list = field(repr=False)
    model_id: str = ""
    family: str = ""
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    prompt_positions: list[int] = field(default_factory=list)
    prompt_tokens: list[str] = field(default_factory=list, repr=False)
    visions: list[VisionLayout] = field(default_factory=list, repr=False)
    images: list = field(default_factory=list, repr=False)
    frames: list = field(default_factory=list, repr=False)
    windows: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.visions:
            self.visions = [self.vision]
        if isinstance(self.attention, list):
            self.attention = RowStore(self.attention, None)

    @property
    def num_steps(self) -> int:
        return len(self.generated_ids)

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)

    @property
    def nbytes(self) -> int:
        """Bytes the captured attention keeps now (a QueryKeyStore grows by the rows it caches)."""
        return self.attention.nbytes

    def view_index(self, image: int = 0, view: str | None = None) -> int:
        """The index in `visions` (the `image_idx` of the heatmap functions) of image `image`'s view named
        `view` ("tiles", "global view", "thumbnail"), or of its main view when `view` is None."""
        for index, layout in enumerate(self.visions):
            if layout.image_index == image and (view is None or layout.view == view):
                return index
        names = sorted({f"image {layout.image_index}: {layout.view or 'its one view'}" for layout in self.visions})
        raise InputError(f"No view {view!r} of image {image} in this run; it has {', '.join(names)}.")

    def layers_in(self, layers) -> list[int]:
        """The captured layers inside the inclusive range `layers` (all of them in it, except where some
        layers have no softmax attention, as in Qwen3.5)."""
        return [idx for idx in self.layer_indices if layers[0] <= idx <= layers[1]]

    def out_of_window(self, layers, query_pos: int) -> list[int]:
        """The layers in the inclusive range `layers` whose sliding window, seen from sequence position
        `query_pos`, no longer reaches any vision token: their rows hold no image attention at all."""
        if not self.windows:
            return []
        last_vision = int(max(int(layout.token_positions.max()) for layout in self.visions))
        return [
            idx
            for idx, window in zip(self.layer_indices, self.windows, strict=True)
            if layers[0] <= idx <= layers[1] and window is not None and query_pos - window + 1 > last_vision
        ]

    def segment_shares(self, name: str) -> np.ndarray:
        """(num_steps, num_layers, num_heads) float32: each step's attention mass on a segment, 0..1."""
        shares = self.attention.shares
        if name not in shares:
            index = torch.from_numpy(segment_positions(self.visions)[name])
            shares[name] = torch.stack(
                [self.step_attention(t)[:, :, index].float().sum(-1) for t in range(self.num_steps)]
            )  # (T, L, H)
        return shares[name].numpy().astype(np.float32)

    def prompt_attention(self, token_pos: int) -> torch.Tensor:
        """(num_layers, num_heads, token_pos + 1) float16: the attention of prompt token `token_pos`."""
        if token_pos not in self.prompt_positions:
            raise OutOfRangeError(
                f"Prompt position {token_pos} was not captured; captured prompt positions are "
                f"{self.prompt_positions[:1]}..{self.prompt_positions[-1:]} (see prompt_positions)."
            )
        return self.attention.prompt(self.prompt_positions.index(token_pos))[:, :, : token_pos + 1]

    @property
    def prompt_rows(self) -> torch.Tensor | None:
        """(num_layers, num_heads, len(prompt_positions), prompt_len) float16, or None when none were kept."""
        if not self.prompt_positions:
            return None
        return torch.stack([self.attention.prompt(i) for i in range(len(self.prompt_positions))], dim=2)

    def step_maps(
        self, steps, keys, layer_sel: slice, head_sel: slice, reduce: str = "mean", renormalize: bool = False
    ) -> torch.Tensor:
        """(len(steps), P) float32 on the CPU: each generated token's attention on key positions `keys` (a
        slice or index tensor of prompt positions, e.g. an image's tokens), reduced over the selected
        layers and heads by `reduce` (mean, max or min; with renormalize each map first sums to 1). The
        store computes many tokens at once, where it lives (`attention_store`)."""
        steps = [int(t) for t in steps]
        for step_idx in steps:
            self._check_step(step_idx)
        return self.attention.maps(steps, keys, layer_sel, head_sel, reduce, renormalize)

    def step_masses(self, steps, keys) -> torch.Tensor:
        """(len(steps), num_layers, num_heads) float32 on the CPU: each generated token's attention mass,
        per layer and head, on key positions `keys` (a slice or index tensor of prompt positions), computed
        together by the store."""
        steps = [int(t) for t in steps]
        for step_idx in steps:
            self._check_step(step_idx)
        return self.attention.masses(steps, keys)

    def summary(self) -> dict[str, str]:
        """What the run holds, in words (what a notebook shows for `display(run)`)."""
        views = ", ".join(
            "{}×{}".format(*layout.grid_hw)
            + (f" × {layout.num_frames} frames" if layout.num_frames > 1 else "")
            + (f" ({layout.view})" if layout.view else "")
            for layout in self.visions
        )
        answer = "".join(self.generated_tokens)
        return {
            "Model": f"{self.model_id} ({self.family})",
            "Prompt": self.settings.prompt if len(self.settings.prompt) <= 300 else self.settings.prompt[:300] + "…",
            "Answer": answer if len(answer) <= 300 else answer[:300] + "…",
            "Tokens": f"{self.num_steps} generated after a prompt of {len(self.prompt_ids)}",
            "Layers": f"{self.num_layers} captured ({self.layer_indices[0]}–{self.layer_indices[-1]})"
            if self.layer_indices
            else "none captured",
            "Heads": f"{self.num_heads} per layer",
            "Image tokens": f"{len({layout.image_index for layout in self.visions})} input(s); grids {views}",
            "Attention kept": f"{self.nbytes / 2**20:.1f} MB, {getattr(self.attention, 'placement', 'rows')}",
        }

    def _repr_html_(self) -> str:
        rows = "".join(
            f'<tr><th style="text-align:left">{html.escape(name)}</th><td style="text-align:left;white-space:pre-wrap">'
            f"{html.escape(value)}</td></tr>"
            for name, value in self.summary().items()
        )
        return f"<table><caption>AttentionRun</caption>{rows}</table>"

    def show(self, step_idx: int = 0, layers=None, heads=None, method: str = "attention", holder=None, **view):
        """Token `step_idx`'s map as an object a notebook renders inline with its caption
        (`notebook.inline.show`; its picture is `.picture`, `.save(path)` writes it)."""
        from notebook.inline import show  # the notebook floor, imported only when a notebook asks

        return show(self, step_idx, layers, heads, method, holder, **view)

    def explore(self, holder=None, widgets: bool | None = None, max_side: int = 640):
        """The token strip and the layer and head ranges, live (`notebook.explorer.explore`)."""
        from notebook.explorer import explore  # the notebook floor, imported only when a notebook asks

        return explore(self, holder, widgets, max_side)

    def _check_step(self, step_idx: int) -> None:
        if not 0 <= step_idx < self.num_steps:
            raise OutOfRangeError(
                f"step_idx {step_idx} is out of range: this run generated {self.num_steps} "
                f"tokens, so pick 0..{self.num_steps - 1}."
            )

    def step_attention(self, step_idx: int) -> torch.Tensor:
        """(num_layers, num_heads, len(prompt_ids) + step_idx) float16 on the CPU: the softmax attention
        of the query at position len(prompt_ids) - 1 + step_idx, the one that produced token step_idx."""
        self._check_step(step_idx)
        return self.attention.step(step_idx)


@dataclass
class LogitLens:
    """Top-k predictions per decoder layer and vision token of one image. Indices are 0-based.

    layer_indices: the decoder layers, axis 0 (layer i means the output of decoder layer i; the
        embedding output is not a layer).
    top_ids: (num_layers, n_cells, k) int64; top_probs: (num_layers, n_cells, k) float32.
    top_tokens: [layer][cell][k] decoded strings. Cell j is grid cell (j // grid_w, j % grid_w).
    """

    layer_indices: list[int]
    top_ids: np.ndarray
    top_probs: np.ndarray
    top_tokens: list[list[list[str]]]
    grid_hw: tuple[int, int]
    image_box_xyxy: tuple[float, float, float, float]
    tracked: np.ndarray | None = None  # (num_layers, n_cells, n_tracked) probabilities of track_ids

    def token_map(self, index: int = 0) -> np.ndarray:
        """(grid_h, grid_w): each patch's probability of tracked token `index`, averaged over layers."""
        if self.tracked is None:
            raise ValueError("No token was tracked; pass track_ids to logit_lens.")
        return self.tracked[:, :, index].mean(axis=0).reshape(self.grid_hw).astype(np.float32)

    def most_confident_layer(self) -> np.ndarray:
        """(n_cells,) the layer index where each cell's top-1 probability peaks."""
        return np.asarray(self.layer_indices)[self.top_probs[:, :, 0].argmax(axis=0)]
