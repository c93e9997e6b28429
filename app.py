"""VLM Attention Explorer: the browser app. Layout, wiring and thin handlers only.

    python app.py [--model ID_OR_PATH] [--host 127.0.0.1] [--port 7860] [--share] [--auth user:pass]
                  [--device auto|cuda|cpu] [--dtype auto|bfloat16|float16|float32]
                  [--session-cache-mb 2048] [--trust-remote-code]

The work happens in `pipeline.py`, `views.py` and the modules below them.
"""

from __future__ import annotations

import argparse
import functools
import html
import json
import logging
import threading
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
from transformers import TextIteratorStreamer

from analysis import (
    GENERIC_PROMPT,
    cell_at,
    head_gallery,
    head_matrix,
    region_to_text,
    system_positions,
    text_attention,
)
from attention_processor import REDUCTIONS
from config import DEMO_MODEL_DIR, DEMO_RANGES, EXAMPLES_DIR, GPU_DEFAULT_MODEL, AppConfig
from explain import gradient_map, rollout_map, vit_combined_maps
from faithfulness import faithfulness
from lenses import lens_html, logit_lens
from model_holder import ModelLoadError
from pipeline import ModelSlot, RunStore, export_run, save_gallery_zip, save_page, save_picture
from utils import load_image, load_video
from views import (
    DISPLAY_NORMALIZATIONS,
    METHODS,
    VIEWS,
    StoredRun,
    ViewSettings,
    matrix_cell,
    matrix_picture,
    method_key,
    raw_heatmap,
    render,
    share_table,
    step_labels,
)
from visualization import COLORMAPS, SIDE_BY_SIDE_GAP

logger = logging.getLogger("app")
USER_ERRORS = (ValueError, LookupError, IndexError, MemoryError, OSError, ModelLoadError)
CSS = """
#token-chips .wrap { gap: 4px !important; max-height: 9em; overflow-y: auto; }
#token-chips label { padding: 2px 8px !important; min-width: 0 !important; font-family: monospace; }
.range-row { gap: 6px !important; }
"""


class ImageUpload(gr.Image):
    """gr.Image that passes the uploaded file through untouched (our loader handles EXIF, 16-bit,
    alpha and frames) and turns an unreadable upload into a message instead of a stack trace."""

    def get_block_name(self) -> str:
        return "image"                                                  # render with gr.Image's frontend

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (OSError, ValueError, SyntaxError) as err:
            raise gr.Error(f"Could not read the uploaded file as an image ({err}). Upload a PNG, JPEG, WebP, "
                           "GIF or BMP file.") from err


def default_model(cfg: AppConfig) -> str | None:
    """--model if given; else a real model on a GPU and the bundled demo model on a CPU."""
    if cfg.model:
        return cfg.model
    if torch.cuda.is_available():
        return GPU_DEFAULT_MODEL
    return str(DEMO_MODEL_DIR) if (DEMO_MODEL_DIR / "config.json").exists() else None


def recommended_ranges(model_id: str, layer_max: int, head_max: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Start-up slider ranges: the demo model's measured best, otherwise everything."""
    if Path(model_id).resolve() == DEMO_MODEL_DIR.resolve():
        return DEMO_RANGES
    return (0, layer_max), (0, head_max)


def example_rows() -> list[list[str]]:
    """[image path, question] pairs shipped in examples/ (empty when the folder is missing)."""
    listing = EXAMPLES_DIR / "examples.json"
    if not listing.exists():
        return []
    return [[str(EXAMPLES_DIR / name), question] for name, question, _ in json.loads(listing.read_text())]


def model_choices(cfg: AppConfig) -> list[str]:
    demo = [str(DEMO_MODEL_DIR)] if (DEMO_MODEL_DIR / "config.json").exists() else []
    return demo + list(cfg.presets)


def _token_label(step_idx: int, token: str) -> str:
    return f"{step_idx}: {token!r}"


class Handlers:
    """Event handlers; each validates input, calls the pipeline and turns user errors into gr.Error."""

    def __init__(self, cfg: AppConfig, slot: ModelSlot, store: RunStore):
        self.cfg, self.slot, self.store = cfg, slot, store

    # -- model ------------------------------------------------------------------------------------
    def model_status(self) -> tuple:
        holder = self.slot.holder
        if holder is None:
            return ("**No model loaded.** Pick one and press Load.",) + (gr.Slider(maximum=1, value=0),) * 4
        layer_max, head_max = holder.num_layers - 1, holder.num_heads - 1
        (layer_lo, layer_hi), (head_lo, head_hi) = recommended_ranges(holder.model_id, layer_max, head_max)
        return (f"**Loaded:** {holder.describe()}",
                gr.Slider(maximum=layer_max, value=layer_lo), gr.Slider(maximum=layer_max, value=layer_hi),
                gr.Slider(maximum=head_max, value=head_lo), gr.Slider(maximum=head_max, value=head_hi))

    def load_model(self, model_id: str, progress=gr.Progress(track_tqdm=True)) -> tuple:
        if not model_id or not str(model_id).strip():
            raise gr.Error("Type a hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a local folder, then press Load.")
        progress(0, desc=f"Loading {model_id}")
        try:
            self.slot.load(model_id.strip(), self.cfg.device, self.cfg.dtype, self.cfg.trust_remote_code)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err
        return self.model_status()

    def page_load(self) -> tuple:
        self.slot.ready.wait()                                          # a start-up load finishes first
        return self.model_status()

    # -- generation -------------------------------------------------------------------------------
    def _media(self, holder, image_path, extra_paths, video_path) -> tuple[list, list | None, list]:
        """(images, video frames or None, one picture per map panel) from the uploads."""
        if video_path:
            if image_path or extra_paths:
                raise gr.Error("Give either images or a video, not both: clear one of them.")
            frames = load_video(video_path)
            step = int(getattr(holder.model.config.vision_config, "temporal_patch_size", 1) or 1)
            return [], frames, frames[::step]
        if not image_path:
            raise gr.Error("No image. Upload an image first.")
        images = [load_image(path) for path in [image_path, *(extra_paths or [])]]
        return images, None, images

    def generate(self, image_path, prompt, max_new_tokens, sampling, temperature, top_p, min_pixels,
                 max_pixels, *values, progress=gr.Progress()):
        """values: the view settings, then the extra images and the video (both optional)."""
        view_values, (extra_paths, video_path) = values[:-2], values[-2:]
        if not prompt or not prompt.strip():
            raise gr.Error("The prompt is empty. Type a question or instruction about the image.")
        if len(prompt) > self.cfg.max_prompt_chars:
            raise gr.Error(f"The prompt has {len(prompt)} characters; this server accepts up to "
                           f"{self.cfg.max_prompt_chars}. Shorten it and try again.")
        try:
            holder = self.slot.get()
            images, frames, panels = self._media(holder, image_path, extra_paths, video_path)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err
        sample = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p)) if sampling else {}
        budget = dict(min_pixels=int(min_pixels) or None, max_pixels=int(max_pixels) or None)
        streamer = TextIteratorStreamer(holder.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict = {}

        def work():
            try:
                with self.slot.lock:
                    outcome["run"] = holder.generate(images or None, prompt, max_new_tokens=int(max_new_tokens),
                                                     video=frames,
                                                     streamer=streamer, max_capture_mb=self.cfg.session_cache_mb,
                                                     **sample, **budget)
            except Exception as err:                                    # reported to the user below
                outcome["error"] = err
                streamer.end()
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        text = ""
        for count, piece in enumerate(streamer, start=1):
            text += piece
            progress(min(count / int(max_new_tokens), 1.0), desc="Generating")
            yield (gr.skip(), text) + (gr.skip(),) * 10
        worker.join()                                                   # the streamer ends before the run is built
        if "error" in outcome:
            err = outcome["error"]
            raise gr.Error(str(err) if isinstance(err, USER_ERRORS) else f"Generation failed: {err}") from err
        stored = StoredRun(outcome["run"], panels[0], images=panels)
        try:
            run_id = self.store.put(stored)
        except MemoryError as err:
            raise gr.Error(str(err)) from err
        run = stored.run
        choices = [(_token_label(t, tok), t) for t, tok in enumerate(run.generated_tokens)]
        prompt_choices = [(_token_label(pos, run.prompt_tokens[pos]), pos) for pos in run.prompt_positions]
        # A new result starts without the options that need extra work (baseline) or one image (sinks).
        fresh = replace(self._settings(*view_values), step_idx=0, relative=False, mask_sinks=False, prompt_pos=None,
                        method="attention")
        picture, caption, plot = self._render_with(stored, fresh)
        yield (run_id, text, gr.Dropdown(choices=choices, value=0), gr.Radio(choices=choices, value=0),
               picture, caption, plot, gr.Dropdown(choices=prompt_choices, value="", allow_custom_value=True),
               False, False, [], "attention")

    # -- views ------------------------------------------------------------------------------------
    def _settings(self, step_idx, layer_lo, layer_hi, head_lo, head_hi, reduce, normalization, colormap,
                  alpha, view, grid, renormalize=False, mask_sinks=False, relative=False,
                  prompt_token=None, exclude_system=False, method="attention") -> ViewSettings:
        return ViewSettings(step_idx=int(step_idx or 0), layers=(int(layer_lo), int(layer_hi)),
                            heads=(int(head_lo), int(head_hi)), reduce=reduce, normalization=normalization,
                            percentile=self.cfg.percentile, colormap=colormap, alpha=float(alpha), view=view,
                            grid=bool(grid), renormalize=bool(renormalize), mask_sinks=bool(mask_sinks),
                            relative=bool(relative), prompt_pos=None if prompt_token in (None, "") else
                            int(prompt_token), exclude_system=bool(exclude_system), method=method or "attention")

    def _render(self, stored: StoredRun, *view_values):
        return self._render_with(stored, self._settings(*view_values))

    def _render_with(self, stored: StoredRun, settings: ViewSettings):
        try:
            picture, caption = render(stored, settings)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err
        table = share_table(stored, settings.layers, settings.heads, settings.step_idx, settings.exclude_system)
        return picture, caption, pd.DataFrame(table)

    def render(self, run_id, *view_values):
        return self._render(self._stored(run_id), *view_values)

    def render_clamped(self, moved: str, run_id, step_idx, layer_lo, layer_hi, head_lo, head_hi, *rest):
        """For the range sliders: the handle being moved pushes the other one along."""
        if moved == "layer_lo":
            layer_hi = max(layer_hi, layer_lo)
        elif moved == "layer_hi":
            layer_lo = min(layer_lo, layer_hi)
        elif moved == "head_lo":
            head_hi = max(head_hi, head_lo)
        else:
            head_lo = min(head_lo, head_hi)
        view = self.render(run_id, step_idx, layer_lo, layer_hi, head_lo, head_hi, *rest)
        return (*view, layer_lo, layer_hi, head_lo, head_hi)

    def pick_chip(self, step_idx):
        """Keep the dropdown and the chips in step; a generated token replaces a picked prompt token."""
        return step_idx, ""

    def relative_toggle(self, run_id, *view_values):
        """Compute the generic-prompt baseline for this image once (a model call), then render."""
        stored, settings = self._stored(run_id), self._settings(*view_values)
        if settings.relative and stored.baseline is None:
            holder = self._model_of(stored, "The generic-prompt baseline")
            if not stored.is_single_image:
                raise gr.Error("'Relative to a generic prompt' works with a single image; generate with one image.")
            budget = {"min_pixels": stored.run.settings.min_pixels, "max_pixels": stored.run.settings.max_pixels}
            try:
                with self.slot.lock:
                    stored.baseline = holder.generate(stored.image, GENERIC_PROMPT, max_new_tokens=1,
                                                      prompt_rows="none", **budget)
            except USER_ERRORS as err:
                raise gr.Error(str(err)) from err
        return self._render(stored, *view_values)

    def method_select(self, run_id, *view_values, progress=gr.Progress()):
        """Compute the rollout or gradient maps of every generated token once (model passes), then render."""
        stored, settings = self._stored(run_id), self._settings(*view_values)
        if settings.method != "attention" and method_key(settings) not in stored.method_maps:
            holder = self._model_of(stored, f"The {settings.method} map")
            if not stored.is_single_image:
                raise gr.Error(f"The {settings.method} map works with a single image; generate with one image.")
            compute = {"rollout": rollout_map,
                       "gradient": functools.partial(gradient_map, max_mb=self.cfg.max_gradient_mb)}
            steps = range(stored.run.num_steps)
            try:
                with self.slot.lock:
                    if settings.method == "vit":
                        heats = [raw_heatmap(stored, replace(settings, method="attention", step_idx=t, relative=False,
                                                             mask_sinks=False)) for t in steps]
                        maps = vit_combined_maps(holder, stored.run, stored.image, heats)
                    else:
                        maps = [compute[settings.method](holder, stored.run, stored.image, t)
                                for t in progress.tqdm(steps, desc=f"{settings.method} maps")]
                    stored.method_maps[method_key(settings)] = maps
            except USER_ERRORS as err:
                raise gr.Error(str(err)) from err
        return self._render(stored, *view_values)

    # -- analysis ---------------------------------------------------------------------------------
    def _stored(self, run_id) -> StoredRun:
        try:
            return self.store.get(run_id)
        except LookupError as err:
            raise gr.Error(str(err)) from err

    def _model_of(self, stored: StoredRun, what: str):
        """The loaded model, if it is the one that made `stored`; views that run the model need it."""
        holder = self.slot.holder
        if holder is None or holder.model_id != stored.run.model_id:
            raise gr.Error(f"{what} needs the model that made this result ({stored.run.model_id}). "
                           "Load it again, or generate with the current model first.")
        return holder

    def _single(self, run_id) -> StoredRun:
        stored = self._stored(run_id)
        if not stored.is_single_image:
            raise gr.Error("This view works on a single image. Generate with one image (no extra images or video) "
                           "to use it; the main picture and its caption cover several images and videos.")
        return stored

    def analysis(self, run_id, metric, *view_values):
        """Layer × head matrix picture, text attention and the per-head gallery for the selected token."""
        stored, s = self._single(run_id), self._settings(*view_values)
        n_maps = s.num_maps
        try:
            matrix = head_matrix(stored.run, s.step_idx, s.layers, s.heads)
            pieces = text_attention(stored.run, s.step_idx, s.layers, s.heads,
                                    exclude_positions=system_positions(stored.run) if s.exclude_system else ())
            tiles = head_gallery(stored.run, stored.image, s.step_idx, s.layers, s.heads, s.colormap) \
                if n_maps <= self.cfg.max_gallery_maps else []
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err
        top = max((p.weight for p in pieces if p.kind != "excluded"), default=1.0) or 1.0
        highlighted = [(p.text, round(p.weight / top, 3) if p.kind != "excluded" else None) for p in pieces]
        sinks = stored.sinks(s.layers, s.heads)
        note = (f"Sink cells (high attention from almost every generated token): {int(sinks.sum())} "
                f"{[list(map(int, cell)) for cell in np.argwhere(sinks)][:8]}; tick 'Mask sink cells' to hide them.")
        if not tiles:
            note += (f" Gallery: narrow the ranges to at most {self.cfg.max_gallery_maps} layer × head maps "
                     f"(now {n_maps}).")
        return (matrix_picture(matrix[metric], s.layers, s.heads, metric), highlighted,
                [(tile, name) for name, tile in tiles], note, [list(s.layers), list(s.heads)])

    def matrix_click(self, run_id, matrix_ranges, step_idx, layer_lo, layer_hi, head_lo, head_hi, reduce,
                     normalization, colormap, alpha, view, grid, renormalize, mask_sinks, relative, prompt_token,
                     exclude_system=False, method="attention", evt: gr.SelectData = None):
        """A click on the layer × head matrix selects that single layer and head."""
        if not matrix_ranges:
            raise gr.Error("Press 'Show analysis' first.")
        layer, head = matrix_cell(evt.index, tuple(matrix_ranges[0]), tuple(matrix_ranges[1]))
        rendered = self.render(run_id, step_idx, layer, layer, head, head, reduce, normalization, colormap, alpha,
                               view, grid, renormalize, mask_sinks, relative, prompt_token, exclude_system,
                               method)
        return (*rendered, layer, layer, head, head)

    def region_click(self, run_id, region, view, evt: gr.SelectData):
        """A click on the picture adds or removes that token cell; shows who attends to the region."""
        stored = self._single(run_id)
        x, y = evt.index
        width = stored.image.size[0]
        if view == "side_by_side" and x >= width:
            x -= width + SIDE_BY_SIDE_GAP                                 # the overlay is the right half
        cell = cell_at(stored.run, x, y)
        cells = {tuple(c) for c in region or []}
        if cell is not None:
            cells ^= {cell}
        return [list(c) for c in sorted(cells)], *self._region_views(stored, cells)

    def region_clear(self):
        return [], pd.DataFrame({"step": [], "share": [], "token": []}), "Click the picture to pick token cells."

    def _region_views(self, stored: StoredRun, cells: set):
        if not cells:
            return self.region_clear()[1:]
        mask = np.zeros(stored.run.vision.grid_hw, dtype=bool)
        mask[tuple(np.array(sorted(cells)).T)] = True
        summary = region_to_text(stored.run, mask)
        table = pd.DataFrame({"step": step_labels(stored.run.num_steps), "share": summary["per_step"],
                              "token": [_token_label(t, tok) for t, tok in enumerate(stored.run.generated_tokens)]})
        per_head = summary["per_head"]                                    # (L, H)
        order = np.argsort(per_head, axis=None)[::-1][:5]
        top = ", ".join(f"layer {stored.run.layer_indices[i // per_head.shape[1]]} head {i % per_head.shape[1]} "
                        f"({per_head.flat[i]:.1%})" for i in order)
        return table, f"**{len(cells)} cells selected.** Heads that attend most to them (mean over tokens): {top}."

    def lens(self, run_id, progress=gr.Progress()) -> tuple[str, str]:
        """Logit lens over the image's patches (a model pass), shown in a sandboxed frame and saved as HTML."""
        stored = self._single(run_id)
        holder = self._model_of(stored, "The logit lens")
        progress(0, desc="Decoding every layer at every image patch")
        try:
            with self.slot.lock:
                made = stored.run.settings
                lens = logit_lens(holder, stored.image, made.prompt, min_pixels=made.min_pixels,
                                  max_pixels=made.max_pixels)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err
        page = lens_html(lens, stored.image)
        path = save_page(page, self.cfg.outputs_dir, "logit-lens")
        frame = (f'<iframe title="Logit lens" sandbox="allow-scripts" style="width:100%;height:820px;border:0" '
                 f'srcdoc="{html.escape(page, quote=True)}"></iframe>')
        return frame, str(path)

    def verify(self, run_id, *view_values, progress=gr.Progress()):
        """Deletion and insertion curves of the current map against a random order (model passes)."""
        stored, s = self._single(run_id), self._settings(*view_values)
        holder = self._model_of(stored, "Verifying")
        if s.prompt_pos is not None:
            raise gr.Error("Verify works on generated tokens; pick one from the token list.")
        progress(0, desc="Blurring cells in map order and in a random order")
        try:
            with self.slot.lock:
                result = faithfulness(holder, stored.run, stored.image, s.step_idx, raw_heatmap(stored, s))
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err
        curves = {"deletion (map order)": result.deletion, "deletion (random order)": result.random_deletion,
                  "insertion (map order)": result.insertion, "insertion (random order)": result.random_insertion}
        table = pd.DataFrame([{"fraction": float(f), "probability": float(p), "curve": name}
                              for name, curve in curves.items() for f, p in zip(result.fractions, curve, strict=True)])
        auc = result.summary()
        verdict = (f"**Deletion AUC** (lower = the map finds what matters): map {auc['deletion']:.3f} vs random "
                   f"{auc['random_deletion']:.3f} · **Insertion AUC** (higher is better): map {auc['insertion']:.3f} "
                   f"vs random {auc['random_insertion']:.3f}. Cells are blurred at about one token's size.")
        return table, verdict

    def gallery_download(self, run_id, *view_values) -> str:
        stored, s = self._single(run_id), self._settings(*view_values)
        n_maps = s.num_maps
        if n_maps > self.cfg.max_gallery_maps:
            raise gr.Error(f"The gallery holds at most {self.cfg.max_gallery_maps} layer × head maps (now {n_maps}); "
                           "narrow the layer or head range.")
        try:
            tiles = head_gallery(stored.run, stored.image, s.step_idx, s.layers, s.heads, s.colormap)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from err
        return str(save_gallery_zip(tiles, self.cfg.outputs_dir, s.step_idx))

    # -- downloads --------------------------------------------------------------------------------
    def download_png(self, run_id, *view_values) -> str:
        picture, _, _ = self._render(self._stored(run_id), *view_values)
        return str(save_picture(picture, self.cfg.outputs_dir, int(view_values[0] or 0)))

    def export_attention(self, run_id) -> list[str]:
        try:
            stored = self.store.get(run_id)
        except LookupError as err:
            raise gr.Error(str(err)) from err
        return [str(path) for path in export_run(stored, self.cfg.outputs_dir)]


# Sliders start with a generous bound so API clients of a model loaded at start-up are not capped;
# each page load (and each Load) narrows them to the loaded model, and ranges are validated anyway.
UNLOADED_SLIDER_MAX = 1023


def _range_sliders(label: str, elem_id: str) -> tuple[gr.Slider, gr.Slider]:
    with gr.Row(elem_id=elem_id, elem_classes="range-row"):
        lo = gr.Slider(0, UNLOADED_SLIDER_MAX, value=0, step=1, label=f"{label} from", elem_id=f"{elem_id}-lo")
        hi = gr.Slider(0, UNLOADED_SLIDER_MAX, value=0, step=1, label=f"{label} to", elem_id=f"{elem_id}-hi")
    return lo, hi


def build_analysis() -> dict[str, gr.components.Component]:
    """The analysis views for the selected token and ranges, refreshed on demand."""
    with gr.Accordion("Analysis: layers × heads, text attention, per-head gallery", open=False,
                      elem_id="analysis"):
        with gr.Row():
            metric = gr.Radio(["share", "entropy"], value="share", elem_id="matrix-metric",
                              label="Matrix: attention share on the image, or spatial entropy of each head's map")
            show = gr.Button("Show analysis for the selected token", elem_id="analysis-btn")
        with gr.Row():
            matrix = gr.Image(type="pil", format="png", interactive=False, elem_id="head-matrix",
                              label="Layer × head (click a cell to show that head's map)")
            text = gr.HighlightedText(label="What the token attends to in the text (with 'Exclude BOS and "
                                      "system prompt', those are shown unhighlighted)", elem_id="text-attention")
        gallery = gr.Gallery(label="Per-head maps (S step, L layer, H head; 1-based)", columns=8, height=420,
                             elem_id="head-gallery")
        with gr.Row():
            note = gr.Markdown("")
            zip_btn = gr.Button("Download the gallery (ZIP)", elem_id="gallery-zip")
        with gr.Row():
            lens_btn = gr.Button("Logit lens: decode every layer at every image patch", elem_id="lens-btn")
            lens_file = gr.File(label="Logit lens page (HTML, works offline)", interactive=False, height=80)
        lens_view = gr.HTML("", elem_id="logit-lens")
        with gr.Row():
            verify_btn = gr.Button("Verify this map: delete / insert cells in map order vs a random order",
                                   elem_id="verify-btn")
            verify_note = gr.Markdown("", elem_id="verify-note")
        verify_plot = gr.LinePlot(x="fraction", y="probability", color="curve", height=240, elem_id="verify-plot",
                                  title="Probability of the token as cells are deleted or inserted")
        gr.Markdown("**Image → text.** Click token cells on the attention picture to build a region "
                    "(click again to remove a cell).")
        with gr.Row():
            region_plot = gr.BarPlot(x="step", y="share", tooltip=["token", "share"], height=200, sort="x",
                                     x_label_angle=-90,
                                     title="Attention share on the region per generated token",
                                     elem_id="region-plot")
            with gr.Column():
                region_note = gr.Markdown("Click the picture to pick token cells.", elem_id="region-note")
                region_clear = gr.Button("Clear region", elem_id="region-clear")
    return {"metric": metric, "show": show, "matrix": matrix, "text": text, "gallery": gallery, "note": note,
            "zip": zip_btn, "region_plot": region_plot, "region_note": region_note, "region_clear": region_clear,
            "lens_btn": lens_btn, "lens_view": lens_view, "lens_file": lens_file, "verify_btn": verify_btn,
            "verify_plot": verify_plot, "verify_note": verify_note}


def build_ui(cfg: AppConfig, slot: ModelSlot, store: RunStore) -> gr.Blocks:
    h = Handlers(cfg, slot, store)
    with gr.Blocks(title="VLM Attention Explorer") as demo:
        run_id = gr.State(None)
        gr.Markdown("## VLM Attention Explorer\nWhere in the image did the model look when it generated each "
                    "token? Maps show the decoder's attention on the image tokens; indices are 0-based.")
        with gr.Row():
            model_box = gr.Dropdown(model_choices(cfg), value=default_model(cfg), allow_custom_value=True,
                                    label="Model (preset, hub id or local folder)", elem_id="model-id", scale=4)
            load_btn = gr.Button("Load", elem_id="load-btn", scale=1)
        status = gr.Markdown("Starting…", elem_id="model-status")
        with gr.Row():
            with gr.Column(scale=2):
                image = ImageUpload(type="filepath", image_mode=None, label="Image", elem_id="image-input",
                                    height=320)
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="e.g. What color is the circle?")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(1, 512, value=cfg.max_new_tokens, step=1, label="Max new tokens")
                    sampling = gr.Checkbox(False, label="Sample (off = greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                    with gr.Row():
                        min_px = gr.Number(0, label="Min pixels (Qwen, 0 = model default)", precision=0)
                        max_px = gr.Number(0, label="Max pixels (Qwen, 0 = model default)", precision=0)
                with gr.Accordion("More images, or a video (Qwen)", open=False):
                    extra_images = gr.File(file_count="multiple", file_types=["image"], elem_id="extra-images",
                                           label="More images, after the first one, in this order")
                    video = gr.Video(label="A video instead of images", elem_id="video-input", height=200)
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                examples = example_rows()
                if examples:
                    gr.Examples(examples, [image, prompt], label="Examples for the demo model", examples_per_page=6)
                answer = gr.Textbox(label="Answer", lines=3, interactive=False, elem_id="answer")
            with gr.Column(scale=3):
                token = gr.Dropdown([], label="Generated token (index: token)", elem_id="token-dropdown",
                                    allow_custom_value=True)
                chips = gr.Radio([], label="Tokens", elem_id="token-chips", show_label=False)
                prompt_token = gr.Dropdown([], value="", label="…or a prompt token (what that word looks at)",
                                           elem_id="prompt-token-dropdown", allow_custom_value=True)
                layer_lo, layer_hi = _range_sliders("Layers", "layer-range")
                head_lo, head_hi = _range_sliders("Heads", "head-range")
                with gr.Row():
                    aggregation = gr.Dropdown(list(REDUCTIONS), value=cfg.aggregation, label="Aggregation",
                                              elem_id="aggregation")
                    normalization = gr.Dropdown(list(DISPLAY_NORMALIZATIONS), value=cfg.normalization,
                                                label="Normalisation", elem_id="normalization")
                    colormap = gr.Dropdown(list(COLORMAPS), value=cfg.colormap, label="Colormap",
                                           elem_id="colormap")
                with gr.Row():
                    alpha = gr.Slider(0, 1, value=cfg.alpha, step=0.05, label="Alpha", elem_id="alpha")
                    view = gr.Radio(list(VIEWS), value=cfg.view, label="View", elem_id="view")
                    grid = gr.Checkbox(False, label="Show token grid", elem_id="grid")
                with gr.Row():
                    renormalize = gr.Checkbox(False, label="Renormalise within the image", elem_id="renormalize")
                    mask_sinks = gr.Checkbox(False, label="Mask sink cells", elem_id="mask-sinks")
                    relative = gr.Checkbox(False, label="Relative to a generic prompt", elem_id="relative")
                    exclude_system = gr.Checkbox(False, label="Exclude BOS and system prompt",
                                                 elem_id="exclude-system")
                method = gr.Radio(list(METHODS), value="attention", elem_id="method",
                                  label="Map: raw attention (layer and head ranges apply), rollout through all "
                                        "layers, gradient-weighted attention, or the raw map pushed through the "
                                        "vision encoder (vit); the last three are computed on demand")
                picture = gr.Image(type="pil", format="jpeg", label="Attention", interactive=False,
                                   elem_id="overlay")
                caption = gr.Markdown("", elem_id="caption")
                plot = gr.BarPlot(x="step", y="share", color="selected", tooltip=["token", "share"], sort="x",
                                  x_label_angle=-90,
                                  title="Attention share on the image per generated token", y_lim=[0, 1],
                                  elem_id="share-plot", height=220)
                with gr.Row():
                    png_btn = gr.Button("Download picture (PNG)")
                    export_btn = gr.Button("Export attention (safetensors + JSON)")
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, height=90)
        analysis = build_analysis()

        view_inputs = [token, layer_lo, layer_hi, head_lo, head_hi, aggregation, normalization, colormap, alpha,
                       view, grid, renormalize, mask_sinks, relative, prompt_token, exclude_system, method]
        sliders = [layer_lo, layer_hi, head_lo, head_hi]
        view_outputs = [picture, caption, plot]
        model_events = dict(concurrency_id="model", concurrency_limit=1)
        render_events = dict(concurrency_id="render", concurrency_limit=4, show_progress="hidden")

        # Extra media reach `generate` through session state, so the API keeps its one-image signature.
        extra_state, video_state, region = gr.State([]), gr.State(None), gr.State([])
        extra_images.change(lambda files: list(files or []), extra_images, extra_state, api_name=False, queue=False)
        video.change(lambda path: path or None, video, video_state, api_name=False, queue=False)
        load_btn.click(h.load_model, [model_box], [status, *sliders], api_name="load_model", **model_events)
        demo.load(h.page_load, None, [status, *sliders], api_name=False, concurrency_id="page",
                  concurrency_limit=None)
        generate_btn.click(h.generate, [image, prompt, max_new, sampling, temperature, top_p, min_px, max_px,
                                        *view_inputs, extra_state, video_state],
                           [run_id, answer, token, chips, *view_outputs, prompt_token, mask_sinks, relative, region,
                            method],
                           api_name="generate", **model_events)
        gr.on([aggregation.input, normalization.input, colormap.input, view.input, grid.input,
               renormalize.input, mask_sinks.input, prompt_token.input, exclude_system.input],
              h.render, [run_id, *view_inputs], view_outputs, api_name="render", trigger_mode="always_last",
              **render_events)
        alpha.input(h.render, [run_id, *view_inputs], view_outputs, api_name=False, trigger_mode="always_last",
                    **render_events)
        for name, slider in zip(("layer_lo", "layer_hi", "head_lo", "head_hi"), sliders, strict=True):
            slider.input(functools.partial(h.render_clamped, name), [run_id, *view_inputs],
                         [*view_outputs, *sliders], api_name=False, trigger_mode="always_last", **render_events)
        chips.input(h.pick_chip, [chips], [token, prompt_token], api_name=False, queue=False).then(
            h.render, [run_id, *view_inputs], view_outputs, api_name=False, **render_events)
        token.input(h.pick_chip, [token], [chips, prompt_token], api_name=False, queue=False).then(
            h.render, [run_id, *view_inputs], view_outputs, api_name=False, **render_events)
        relative.input(h.relative_toggle, [run_id, *view_inputs], view_outputs, api_name=False, **model_events)
        method.input(h.method_select, [run_id, *view_inputs], view_outputs, api_name="method", **model_events)
        analysis_inputs = [run_id, analysis["metric"], *view_inputs]
        matrix_ranges = gr.State([])
        analysis_outputs = [analysis["matrix"], analysis["text"], analysis["gallery"], analysis["note"], matrix_ranges]
        gr.on([analysis["show"].click, analysis["metric"].input], h.analysis, analysis_inputs, analysis_outputs,
              api_name="analysis", **render_events)
        analysis["matrix"].select(h.matrix_click, [run_id, matrix_ranges, *view_inputs], [*view_outputs, *sliders],
                                  api_name=False, **render_events)
        picture.select(h.region_click, [run_id, region, view], [region, analysis["region_plot"],
                                                                analysis["region_note"]],
                       api_name=False, **render_events)
        analysis["region_clear"].click(h.region_clear, None, [region, analysis["region_plot"],
                                                            analysis["region_note"]], api_name=False)
        analysis["lens_btn"].click(h.lens, [run_id], [analysis["lens_view"], analysis["lens_file"]],
                                   api_name="logit_lens", **model_events)
        analysis["verify_btn"].click(h.verify, [run_id, *view_inputs],
                                     [analysis["verify_plot"], analysis["verify_note"]], api_name="verify",
                                     **model_events)
        analysis["zip"].click(h.gallery_download, [run_id, *view_inputs], [files], api_name="gallery_zip",
                              **render_events)
        png_btn.click(h.download_png, [run_id, *view_inputs], [files], api_name="download_png", **render_events)
        export_btn.click(h.export_attention, [run_id], [files], api_name="export_attention", **render_events)
    return demo


def parse_args(argv: list[str] | None = None) -> AppConfig:
    parser = argparse.ArgumentParser(description="VLM Attention Explorer")
    parser.add_argument("--model", help="hub id or local folder to load at start-up")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    parser.add_argument("--auth", help="user:pass protecting the page and the API")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--session-cache-mb", type=int, default=AppConfig.session_cache_mb,
                        help="memory for all sessions' results; least recently used are evicted")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow checkpoints that ship their own Python code (runs that code)")
    args = parser.parse_args(argv)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must look like user:password")
        auth = (user, password)
    return AppConfig(model=args.model, host=args.host, port=args.port, share=args.share, auth=auth,
                     device=args.device, dtype=args.dtype, session_cache_mb=args.session_cache_mb,
                     trust_remote_code=args.trust_remote_code)


def start_loading(cfg: AppConfig, slot: ModelSlot) -> None:
    """Load the start-up model in the background so the page is served at once."""
    model_id = default_model(cfg)
    if not model_id:
        return
    slot.ready.clear()

    def load():
        try:
            slot.load(model_id, cfg.device, cfg.dtype, cfg.trust_remote_code)
        except Exception as err:                                        # the page shows "no model loaded"
            logger.error("could not load %s: %s", model_id, err)
        finally:
            slot.ready.set()
    threading.Thread(target=load, daemon=True).start()


def launch_options(cfg: AppConfig) -> dict:
    """How the server is exposed: only the app's own output folder is served, uploads are capped."""
    return dict(server_name=cfg.host, server_port=cfg.port, share=cfg.share, auth=cfg.auth,
                allowed_paths=[str(cfg.outputs_dir)], max_file_size=cfg.max_upload, ssr_mode=False, css=CSS,
                theme=gr.themes.Soft())


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    if cfg.share and cfg.auth is None:
        logger.warning("--share without --auth: anyone holding the public link can use this machine and its GPU. "
                       "Add --auth user:password to protect it.")
    cfg.outputs_dir.mkdir(parents=True, exist_ok=True)
    slot, store = ModelSlot(), RunStore(cfg.session_cache_mb)
    start_loading(cfg, slot)
    demo = build_ui(cfg, slot, store)
    demo.queue(default_concurrency_limit=1)
    demo.launch(**launch_options(cfg), prevent_thread_lock=True)
    if cfg.share:
        if demo.share_url:
            logger.info("Public link: %s", demo.share_url)
        else:
            logger.warning("Could not create a public share link: the Gradio relay is not reachable from this "
                           "machine. The app is still served locally at %s", demo.local_url)
    demo.block_thread()


if __name__ == "__main__":
    main()
