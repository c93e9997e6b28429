"""What the app does, without the app: the shared model slot, per-session results, views, exports.

`app.py` validates input and calls one function here per event. Nothing here imports gradio, so
scripts and tests use the same code paths as the browser.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from attention_extractor import AttentionRun
from attention_processor import (heatmap_range, image_shares, normalize_heatmap, prompt_token_heatmap,
                                 range_slice, token_heatmap, vision_share)
from analysis import gallery_zip, relative_heatmap, sink_cells
from model_holder import ModelHolder, check_loadable
from visualization import heatmap_image, labelled, overlay, side_by_side

logger = logging.getLogger(__name__)
VIEWS: tuple[str, ...] = ("overlay", "side_by_side", "heatmap")
DISPLAY_NORMALIZATIONS: tuple[str, ...] = ("minmax", "percentile", "shared")


class EvictedError(LookupError):
    """A session's result was dropped to keep memory bounded."""


class ModelSlot:
    """The one model the server holds. Loading and generating are serialised by `lock`."""

    def __init__(self):
        self.lock = threading.RLock()
        self.holder: ModelHolder | None = None
        self.ready = threading.Event()                                  # cleared while a start-up load runs
        self.ready.set()

    def load(self, model_id: str, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False) -> ModelHolder:
        with self.lock:
            if self.holder is not None and self.holder.model_id == str(model_id):
                return self.holder
            check_loadable(str(model_id), trust_remote_code)            # a typo keeps the current model
            self.holder = None                                          # free the old weights first
            self.holder = ModelHolder.load(model_id, device=device, dtype=dtype,
                                           trust_remote_code=trust_remote_code)
            return self.holder

    def get(self) -> ModelHolder:
        if self.holder is None and not self.ready.is_set():
            raise LookupError("The start-up model is still loading; try again in a moment.")
        if self.holder is None:
            raise LookupError("No model is loaded. Pick a model and press Load first.")
        return self.holder


@dataclass
class StoredRun:
    """A run with the upright image it was made from, and caches for fast re-rendering."""

    run: AttentionRun
    image: Image.Image
    images: list[Image.Image] = field(default_factory=list)           # per layout; video: per time step
    shares: np.ndarray = field(default=None)                           # (T, L, H), from vision_share
    baseline: AttentionRun | None = None                                # same image, generic prompt
    _ranges: dict = field(default_factory=dict)
    _sinks: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.images:
            self.images = [self.image]
        if self.shares is None:
            self.shares = vision_share(self.run)
        first_vision = int(self.run.vision.token_positions[0])          # BOS, system prompt, chat header
        self.system_shares = np.stack([rows[:, :, :first_vision].float().sum(-1).numpy()
                                       for rows in self.run.rows])      # (T, L, H)

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
    def is_single_image(self) -> bool:
        return len(self.run.visions) == 1 and self.run.vision.num_frames == 1

    @property
    def nbytes(self) -> int:
        pixels = sum(image.size[0] * image.size[1] * 3 for image in self.images)
        baseline = self.baseline.nbytes if self.baseline is not None else 0
        return self.run.nbytes + pixels + self.shares.nbytes + baseline

    def shared_range(self, settings: "ViewSettings") -> tuple[float, float]:
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


class RunStore:
    """Results of all sessions, least recently used evicted first beyond `cap_mb`."""

    def __init__(self, cap_mb: float):
        self.cap_bytes = int(cap_mb * 2**20)
        self._runs: OrderedDict[str, StoredRun] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, stored: StoredRun) -> str:
        if stored.nbytes > self.cap_bytes:
            raise MemoryError(f"This result needs {stored.nbytes / 2**20:.0f} MB, more than the "
                              f"{self.cap_bytes / 2**20:.0f} MB kept for all sessions. Generate fewer tokens, "
                              "use a smaller image budget, or start the app with a larger --session-cache-mb.")
        run_id = uuid.uuid4().hex
        with self._lock:
            self._runs[run_id] = stored
            while self.total_bytes > self.cap_bytes:
                evicted, _ = self._runs.popitem(last=False)
                logger.info("evicted run %s to stay under %d MB", evicted, self.cap_bytes // 2**20)
        return run_id

    def get(self, run_id: str | None) -> StoredRun:
        with self._lock:
            if not run_id:
                raise LookupError("Nothing generated yet. Upload an image, type a prompt and press Generate.")
            if run_id not in self._runs:
                raise EvictedError("This result was removed to free memory for other sessions. "
                                   "Press Generate again to recompute it.")
            self._runs.move_to_end(run_id)
            return self._runs[run_id]

    @property
    def total_bytes(self) -> int:
        return sum(stored.nbytes for stored in self._runs.values())

    def __len__(self) -> int:
        return len(self._runs)


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
    exclude_system: bool = False             # shares measured without BOS and the system prompt
    prompt_pos: int | None = None            # show this prompt token's map instead of step_idx's
    interpolation: str = "bilinear"


def raw_heatmap(stored: StoredRun, s: ViewSettings) -> np.ndarray:
    """(grid_h, grid_w) float32 before display scaling, with the sink and baseline options applied."""
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
    if s.mask_sinks:
        sinks = stored.sinks(s.layers, s.heads)
        if sinks.any() and not sinks.all():
            heat = np.where(sinks, heat[~sinks].min(), heat).astype(np.float32)
    return heat


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
    box = run.vision.image_box_xyxy
    draw = dict(colormap=s.colormap, interpolation=s.interpolation, value_range=(0.0, 1.0), grid=s.grid)
    if s.view == "heatmap":
        picture = heatmap_image(stored.image, unit, box, **draw)
    else:
        picture = overlay(stored.image, unit, box, alpha=s.alpha, **draw)
        if s.view == "side_by_side":
            picture = side_by_side(stored.image, picture)
    return picture, caption(stored, settings, heat)


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
            panels.append((stored.images[i], heat, layout.image_box_xyxy, f"image {i}{share}"))
        else:
            panels += [(stored.images[f], heat[f], layout.image_box_xyxy, f"time step {f}{share if f == 0 else ''}")
                       for f in range(layout.num_frames)]
    return panels


def render_strip(stored: StoredRun, s: ViewSettings, height: int = 360) -> tuple[Image.Image, str]:
    """Several images (or a video's frames) side by side, each with its map on ONE shared scale."""
    if s.relative or s.mask_sinks:
        raise ValueError("'Relative to a generic prompt' and 'Mask sink cells' work with a single image; "
                         "untick them to compare several images or frames.")
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
    who = (f"Token {s.step_idx} {stored.run.generated_tokens[s.step_idx]!r}" if s.prompt_pos is None
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
    n_maps = (s.layers[1] - s.layers[0] + 1) * (s.heads[1] - s.heads[0] + 1)
    layer_sel = range_slice(s.layers, run.layer_indices, "layer")
    if s.prompt_pos is None:
        share = stored.image_share(s.layers, s.heads, s.exclude_system)[s.step_idx]
        who = f"Token {s.step_idx} {run.generated_tokens[s.step_idx]!r}"
    else:
        rows = run.prompt_attention(s.prompt_pos)[layer_sel, s.heads[0]:s.heads[1] + 1]   # (l, h, pos + 1)
        share = rows[:, :, [p for p in run.vision.token_positions if p <= s.prompt_pos]].float().sum(-1).mean()
        piece = run.prompt_tokens[s.prompt_pos] if run.prompt_tokens else ""
        who = f"Prompt token {s.prompt_pos} {piece!r}"
    grid_h, grid_w = run.vision.grid_hw
    text = (f"{who} · layers {_range_text(s.layers)} · "
            f"heads {_range_text(s.heads)} · {s.reduce} of {n_maps} maps · normalised: {norm} · "
            f"{grid_h}×{grid_w} token grid · {share:.0%} of this token's attention is on the image "
            f"(peak cell {heat.max():.3g}).")
    sinks = int(stored.sinks(s.layers, s.heads).sum()) if s.mask_sinks else 0
    options = [name for flag, name in ((s.renormalize, "renormalised within the image"),
                                       (s.mask_sinks, f"{sinks} sink cells masked"),
                                       (s.relative, "divided by the generic-prompt map"),
                                       (s.exclude_system, "shares without BOS and the system prompt")) if flag]
    if options:
        text += " Options: " + ", ".join(options) + "."
    width, height = run.vision.image_size
    x0, y0, x1, y1 = run.vision.image_box_xyxy
    if x0 > 0.5 or y0 > 0.5 or x1 < width - 0.5 or y1 < height - 0.5:
        text += " Hatched: parts of the image the model never saw (outside its crop)."
    return text


def share_table(stored: StoredRun, layers: tuple[int, int], heads: tuple[int, int], step_idx: int,
                exclude_system: bool = False) -> dict:
    """Columns for a plot of the attention share on the image, per generated token."""
    run = stored.run
    shares = stored.image_share(layers, heads, exclude_system)
    return {"step": list(range(run.num_steps)), "share": [float(v) for v in shares],
            "token": [f"{t}: {tok}" for t, tok in enumerate(run.generated_tokens)],
            "selected": ["selected" if t == step_idx else "other" for t in range(run.num_steps)]}


def export_run(stored: StoredRun, out_dir: Path) -> tuple[Path, Path]:
    """Write the raw captured attention (safetensors) and its metadata (JSON) to a new folder.

    Tensor `step_{t}` has shape (num_layers, num_heads, len(prompt_ids) + t), float16.
    """
    run = stored.run
    folder = Path(out_dir) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=False)                          # never overwrite anyone's files
    tensors_path, meta_path = folder / "attention.safetensors", folder / "attention.json"
    tensors = {f"step_{t}": rows.contiguous() for t, rows in enumerate(run.rows)}
    if run.prompt_rows is not None:
        tensors["prompt_rows"] = run.prompt_rows.contiguous()
    save_file(tensors, str(tensors_path))
    meta = {"model_id": run.model_id, "family": run.family, "prompt_ids": run.prompt_ids,
            "prompt_tokens": run.prompt_tokens, "prompt_positions": run.prompt_positions,
            "generated_ids": run.generated_ids, "generated_tokens": run.generated_tokens,
            "layer_indices": run.layer_indices, "num_heads": run.num_heads,
            "visions": [layout.to_dict() for layout in run.visions], "settings": run.settings,
            "tensors": "step_{t}: float16 (num_layers, num_heads, len(prompt_ids) + t), softmax row of the "
                       "query that produced generated token t; prompt_rows: float16 (num_layers, num_heads, "
                       "len(prompt_positions), len(prompt_ids)), row i for prompt position prompt_positions[i]; "
                       "indices 0-based"}
    meta_path.write_text(json.dumps(meta, indent=1))
    return tensors_path, meta_path


def save_picture(picture: Image.Image, out_dir: Path, step_idx: int) -> Path:
    """The current picture as a PNG in a fresh, uniquely named file."""
    path = Path(out_dir) / f"attention-token{step_idx}-{uuid.uuid4().hex[:8]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


MATRIX_CELL_PX, MATRIX_MARGIN_PX = 22, 36


def matrix_picture(values: np.ndarray, layers: tuple[int, int], heads: tuple[int, int], metric: str) -> Image.Image:
    """(l, h) values as a picture: one row per layer, one column per head, labelled 0-based."""
    import cv2
    from PIL import ImageDraw
    cell, margin = MATRIX_CELL_PX, MATRIX_MARGIN_PX
    unit = normalize_heatmap(values, "fixed", value_range=(0.0, max(float(values.max()), 1e-6)))  # (l, h)
    cells = cv2.resize(unit, (unit.shape[1] * cell, unit.shape[0] * cell), interpolation=cv2.INTER_NEAREST)
    colored = cv2.cvtColor(cv2.applyColorMap(cv2.convertScaleAbs(cells, alpha=255.0), cv2.COLORMAP_VIRIDIS),
                           cv2.COLOR_BGR2RGB)                                   # OpenCV is BGR
    canvas = Image.new("RGB", (colored.shape[1] + margin, colored.shape[0] + margin), "white")
    canvas.paste(Image.fromarray(colored), (margin, margin))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), f"{metric}: rows = layers, columns = heads", fill=(0, 0, 0))
    for i, layer_idx in enumerate(range(layers[0], layers[1] + 1)):
        draw.text((2, margin + i * cell + 5), f"L{layer_idx}", fill=(0, 0, 0))
    for j, head_idx in enumerate(range(heads[0], heads[1] + 1)):
        draw.text((margin + j * cell + 3, margin - 12), f"{head_idx}", fill=(0, 0, 0))
    return canvas


def matrix_cell(index_xy, layers: tuple[int, int], heads: tuple[int, int]) -> tuple[int, int]:
    """(layer_idx, head_idx) under a click at pixel (x, y) of `matrix_picture`, clamped to the ranges."""
    x, y = int(index_xy[0]), int(index_xy[1])
    row = min(max((y - MATRIX_MARGIN_PX) // MATRIX_CELL_PX, 0), layers[1] - layers[0])
    col = min(max((x - MATRIX_MARGIN_PX) // MATRIX_CELL_PX, 0), heads[1] - heads[0])
    return layers[0] + row, heads[0] + col


def save_gallery_zip(tiles: list[tuple[str, Image.Image]], out_dir: Path, step_idx: int) -> Path:
    """The per-head gallery as a ZIP of `S{step}_L{layer}_H{head}.png` in a fresh, uniquely named file."""
    path = Path(out_dir) / f"heads-token{step_idx}-{uuid.uuid4().hex[:8]}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gallery_zip(tiles))
    return path


def save_page(page: str, out_dir: Path, stem: str) -> Path:
    """A self-contained HTML page in a fresh, uniquely named file."""
    path = Path(out_dir) / f"{stem}-{uuid.uuid4().hex[:8]}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
