"""The Gradio adapters: component values in, typed settings by name, one pipeline or view call out.

Each handler validates its input, builds a `ViewSettings` from the view controls by name
(`VIEW_CONTROLS`), calls one function of `pipeline.py` or `views.py`, and lets `user_errors` turn
the project's user errors into `gr.Error` messages. Threads and the model lock live in the
pipeline; the words shown to users live in the views.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from analysis import cell_at, head_matrix, region_to_text, system_positions, text_attention
from config import DEMO_MODEL_DIR, DEMO_RANGES, AppConfig
from families import frames_per_panel
from gallery import head_gallery
from pipeline import (
    ModelSlot,
    RunStore,
    export_run,
    lens_page,
    method_maps,
    prune_outputs,
    relative_baseline,
    save_animation,
    save_gallery_zip,
    save_page,
    save_picture,
    stream_generation,
    verify_map,
)
from records import UserError
from utils import load_image, load_video
from views import (
    StoredRun,
    ViewSettings,
    analysis_note,
    animation_frames,
    as_text,
    matrix_view,
    on_screen,
    outline_cells,
    region_note,
    render,
    screen_zoom,
    share_table,
    step_labels,
    token_label,
    verify_note,
)
from visualization import SIDE_BY_SIDE_GAP

logger = logging.getLogger(__name__)

# The view controls, by their API names, in the order they are wired, with their defaults.
VIEW_CONTROLS: dict[str, object] = {
    "token": 0, "layer_lo": None, "layer_hi": None, "head_lo": None, "head_hi": None,
    "aggregation": AppConfig.aggregation, "normalization": AppConfig.normalization, "colormap": AppConfig.colormap,
    "alpha": AppConfig.alpha, "view": AppConfig.view, "grid": False,
    "renormalize": False, "mask_sinks": False, "relative": False, "prompt_token": None, "exclude_system": False,
    "method": "attention",
}
# The map's order in a strong colour, the random order in grey, in both verify plots.
VERIFY_COLORS = ("#d62728", "#7f7f7f")
# What a new result shows in the views derived from the previous one (the analysis tabs, in the order
# of app.DERIVED_VIEWS), so nothing on the page belongs to an older run; then the downloads are emptied.
CLEARED_VIEWS = (None, None, [], "", "", None, None, None, "", None, "Click the picture to pick token cells.")
# Errors a user can act on; anything else is a bug and reaches the log with its traceback.
USER_ERRORS = (UserError, ValueError, LookupError, IndexError, MemoryError, OSError)


def _as_message(err: Exception) -> gr.Error:
    """A user error as the message the page shows, logged as one line (no traceback: nothing broke)."""
    message = err if isinstance(err, gr.Error) else gr.Error(html.escape(str(err), quote=False))
    message.print_exception = False
    logger.info("user error: %s", message.message if isinstance(message, gr.Error) else message)
    return message


def user_errors(handler):
    """Show the project's user errors as `gr.Error` messages (the app keeps serving), each logged as one
    line; works for plain and streaming (generator) handlers alike."""
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def stream(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except gr.Error as err:                                     # already a message for the user
                raise _as_message(err) from err.__cause__
            except USER_ERRORS as err:
                raise _as_message(err) from err
        return stream

    @functools.wraps(handler)
    def call(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except gr.Error as err:                                         # already a message for the user
            raise _as_message(err) from err.__cause__
        except USER_ERRORS as err:
            raise _as_message(err) from err
    return call


def named_api(handler, leading: tuple[str, ...], view: bool = True, trailing: tuple[str, ...] = (),
              progress: bool = False, request: bool = False):
    """`handler` (which takes its values positionally) under a signature that names every value, so API
    clients see `run_id, token, layer_lo, …` instead of `param_0, param_1, …`: the `leading` inputs, the
    view controls, then `trailing` inputs (session state, which API clients do not send). With
    `progress`, Gradio passes its progress tracker last; it reaches the handler as the `progress` keyword,
    and with `request` the request (for its session) after it, as the `request` keyword."""
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in leading]
    if view:
        params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
                   for name, default in VIEW_CONTROLS.items()]
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in trailing]
    if progress:
        params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    if request:
        params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                        annotation=gr.Request))
    special = [name for name, wanted in (("progress", progress), ("request", request)) if wanted]

    def split(args: tuple) -> tuple[tuple, dict]:
        if not special:
            return args, {}
        return args[:-len(special)], dict(zip(special, args[-len(special):], strict=True))

    if inspect.isgeneratorfunction(handler):
        def forward(*args):
            positional, keywords = split(args)
            yield from handler(*positional, **keywords)
    else:
        def forward(*args):
            positional, keywords = split(args)
            return handler(*positional, **keywords)
    forward.__signature__ = inspect.Signature(params)
    forward.__annotations__ = {"request": gr.Request} if request else {}
    forward.__name__ = forward.__qualname__ = getattr(handler, "__name__", "handler")
    return forward


def recommended_ranges(model_id: str, layer_max: int, head_max: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Start-up slider ranges: the demo model's measured best, otherwise everything."""
    if Path(model_id).resolve() == DEMO_MODEL_DIR.resolve():
        return DEMO_RANGES
    return (0, layer_max), (0, head_max)


class Handlers:
    """Event handlers. View values arrive positionally in `VIEW_CONTROLS` order."""

    def __init__(self, cfg: AppConfig, slot: ModelSlot, store: RunStore):
        self.cfg, self.slot, self.store = cfg, slot, store

    # -- model ------------------------------------------------------------------------------------
    def model_status(self) -> tuple:
        """(status line, layer range, head range, video input): the ranges span the loaded model, set to
        its defaults; the video input shows only for a model that takes video."""
        holder = self.slot.holder
        if holder is None:
            failed = self.slot.startup_failure
            status = ("**No model loaded.** Pick one and press Load." if not failed else
                      f"**The start-up model did not load.** {as_text(failed)} Pick a model and press Load, or "
                      "restart the app with another `--model` (or `--device cpu` on a machine without a GPU).")
            return ((status,) + (gr.HTML(value=[0, 0], maximum=0),) * 2
                    + (gr.Video(visible=False),))
        layer_max, head_max = holder.num_layers - 1, holder.num_heads - 1
        layers, heads = recommended_ranges(holder.model_id, layer_max, head_max)
        return (f"**Loaded:** {as_text(holder.describe())}",
                gr.HTML(value=list(layers), maximum=layer_max), gr.HTML(value=list(heads), maximum=head_max),
                gr.Video(visible=holder.takes_video))

    @user_errors
    def load_model(self, model_id: str, progress=gr.Progress(track_tqdm=True)) -> str:
        """Load a model for everyone; returns the status line. A failure changes nothing (the message
        says why); the page then puts the picker back on the loaded model (`loaded_model_id`)."""
        if not self.cfg.allow_model_loading:
            raise gr.Error("Loading other models is turned off on this server; its operator chose the model. "
                           "Start the app with --allow-model-loading to change that.")
        if not model_id or not str(model_id).strip():
            raise gr.Error("Type a hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a local folder, then press Load.")
        progress(0, desc=f"Loading {model_id}")
        self.slot.load(model_id.strip(), self.cfg.device, self.cfg.dtype, self.cfg.trust_remote_code,
                       self.cfg.max_pixels_cap)
        return self.model_status()[0]

    def loaded_model_id(self):
        """The picker's value after a failed load: the model still loaded (the typed id is dropped)."""
        holder = self.slot.holder
        return gr.Dropdown(value=holder.model_id) if holder is not None else gr.skip()

    def page_load(self) -> tuple:
        """A new page's model status, at once. While the start-up model loads, a note and an active timer
        that asks again (a page load never waits for the load, so it never holds a worker)."""
        if not self.slot.ready.is_set():
            return (("**Loading the start-up model…** This page updates when it is ready.",) + (gr.skip(),) * 3
                    + (gr.Timer(active=True),))
        return self.model_status() + (gr.Timer(active=False),)

    # -- generation -------------------------------------------------------------------------------
    def _media(self, image_path, extra_paths, video_path) -> tuple[list, list | None, list]:
        """(images, video frames or None, one picture per map panel) from the uploads."""
        if video_path:
            if image_path or extra_paths:
                raise gr.Error("Give either images or a video, not both: clear one of them.")
            frames = load_video(video_path)
            return [], frames, frames[::frames_per_panel(self.slot.get().model.config)]
        if not image_path:
            raise gr.Error("No image. Upload an image first.")
        images = [load_image(path, self.cfg.max_image_pixels) for path in [image_path, *(extra_paths or [])]]
        return images, None, images

    @user_errors
    def generate(self, image_path, prompt, max_new_tokens, sampling, temperature, top_p, min_pixels,
                 max_pixels, *values, progress=gr.Progress(), request: gr.Request | None = None):
        """values: the view controls, then the extra images and the video (both optional).
        A session's new generation stops the one it still runs (see `stop_generation`)."""
        view_values, (extra_paths, video_path) = values[:-2], values[-2:]
        if not prompt or not prompt.strip():
            raise gr.Error("The prompt is empty. Type a question or instruction about the image.")
        if len(prompt) > self.cfg.max_prompt_chars:
            raise gr.Error(f"The prompt has {len(prompt)} characters; this server accepts up to "
                           f"{self.cfg.max_prompt_chars}. Shorten it and try again.")
        self.slot.get()                                                 # a clear message when none is loaded
        images, frames, panels = self._media(image_path, extra_paths, video_path)
        sample = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p)) if sampling else {}
        budget = dict(min_pixels=int(min_pixels) or None, max_pixels=int(max_pixels) or None)
        text, run = "", None
        session = getattr(request, "session_hash", None)
        cancel = self.slot.begin(session)
        stream = stream_generation(self.slot, images, prompt, int(max_new_tokens), video=frames,
                                   max_capture_mb=self.cfg.session_cache_mb, cancel=cancel, **sample, **budget)
        try:
            for count, item in enumerate(stream, start=1):
                if isinstance(item, str):
                    text = item
                    progress(min(count / int(max_new_tokens), 1.0), desc="Generating")
                    yield (gr.skip(), text) + (gr.skip(),) * (10 + len(CLEARED_VIEWS) + 1)
                else:
                    run = item
        except (gr.Error, *USER_ERRORS):
            raise
        except Exception as err:                                        # a bug: logged, and said plainly
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed: {html.escape(str(err), quote=False)}. The server keeps running; "
                           "try again, and report this if it repeats.") from err
        finally:
            self.slot.end(session, cancel)
        stored = StoredRun(run, images=panels)
        run_id, run = self.store.put(stored), stored.run
        unknown = self.slot.get().unknown_words(prompt)
        if unknown:
            text += (f"\n\n⚠ Unknown to this model (it read them as <unk>): {', '.join(unknown)}. The answer may "
                     "not follow the question; see the words it knows below the examples.")
        choices = [(token_label(t, tok), t) for t, tok in enumerate(run.generated_tokens)]
        prompt_choices = [(token_label(pos, run.prompt_tokens[pos]), pos) for pos in run.prompt_positions]
        # A new result starts without the options that need extra work (baseline) or one image (sinks).
        fresh = replace(self._settings(*view_values), step_idx=0, relative=False, mask_sinks=False, prompt_pos=None,
                        method="attention")
        picture, caption, plot = self._render_with(stored, fresh)
        yield (run_id, text, gr.Dropdown(choices=choices, value=0), gr.Radio(choices=choices, value=0),
               picture, caption, plot, gr.Dropdown(choices=prompt_choices, value="", allow_custom_value=True),
               False, False, [], "attention", *CLEARED_VIEWS, [])

    def stop_generation(self, request: gr.Request | None = None) -> None:
        """Stop this session's running generation at its next token (wired, unqueued, to Generate, so
        asking again never waits behind one's own old answer)."""
        self.slot.stop(getattr(request, "session_hash", None))

    # -- views ------------------------------------------------------------------------------------
    def _settings(self, *view_values) -> ViewSettings:
        """The view controls' values (positionally, in `VIEW_CONTROLS` order; trailing ones may be left
        out) as one ViewSettings, by name."""
        if len(view_values) > len(VIEW_CONTROLS):
            raise ValueError(f"Got {len(view_values)} view values; the view has {len(VIEW_CONTROLS)} controls.")
        v = {**VIEW_CONTROLS, **dict(zip(VIEW_CONTROLS, view_values, strict=False))}  # a prefix
        layers, heads = self._default_ranges()                          # what the page starts with
        layers = tuple(int(given) if given is not None else default
                       for given, default in zip((v["layer_lo"], v["layer_hi"]), layers, strict=True))
        heads = tuple(int(given) if given is not None else default
                      for given, default in zip((v["head_lo"], v["head_hi"]), heads, strict=True))
        return ViewSettings(step_idx=int(v["token"] or 0), layers=layers, heads=heads, reduce=v["aggregation"],
                            normalization=v["normalization"], percentile=self.cfg.percentile,
                            colormap=v["colormap"], alpha=float(v["alpha"]), view=v["view"], grid=bool(v["grid"]),
                            renormalize=bool(v["renormalize"]), mask_sinks=bool(v["mask_sinks"]),
                            relative=bool(v["relative"]),
                            prompt_pos=None if v["prompt_token"] in (None, "") else int(v["prompt_token"]),
                            exclude_system=bool(v["exclude_system"]), method=v["method"] or "attention")

    def _default_ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The ranges the page starts with for the loaded model (API calls that leave them out get these)."""
        holder = self.slot.holder
        if holder is None:
            return (0, 0), (0, 0)
        return recommended_ranges(holder.model_id, holder.num_layers - 1, holder.num_heads - 1)

    def _render_with(self, stored: StoredRun, settings: ViewSettings, screen: bool = True):
        """(picture, caption, share table); `screen`: the picture enlarged for display (small images)."""
        picture, caption = render(stored, settings)
        picture = on_screen(stored, picture) if screen else picture
        table = share_table(stored, settings.layers, settings.heads, settings.step_idx, settings.exclude_system)
        return picture, caption, pd.DataFrame(table)

    @user_errors
    def render(self, run_id, *view_values):
        return self._render_with(self.store.get(run_id), self._settings(*view_values))

    @user_errors
    def refresh(self, run_id, *view_values):
        """`render` after the ranges moved; nothing to draw (no result yet) leaves the views as they are."""
        if run_id is None:
            return (gr.skip(),) * 3
        try:
            return self.render(run_id, *view_values)
        except gr.Error:                        # ranges of a newly loaded model over an older model's result
            if self.slot.holder is not None and self.store.get(run_id).run.model_id != self.slot.holder.model_id:
                return (gr.skip(),) * 3
            raise

    def pick_chip(self, step_idx):
        """Keep the dropdown and the chips in step; a generated token replaces a picked prompt token."""
        return step_idx, ""

    def pick_prompt_token(self, prompt_pos):
        """A picked prompt token unselects the chips, so any chip, the last one too, brings its map back."""
        return gr.skip() if prompt_pos in (None, "") else gr.Radio(value=None)

    @user_errors
    def relative_toggle(self, run_id, *view_values):
        """Compute the generic-prompt baseline for this image once (a model call), then render."""
        stored, settings = self.store.get(run_id), self._settings(*view_values)
        if settings.relative:
            if not stored.is_single_image:
                raise gr.Error("'Relative to a generic prompt' works with a single image; generate with one image.")
            relative_baseline(self.slot, stored)
        return self._render_with(stored, settings)

    @user_errors
    def method_select(self, run_id, *view_values, progress=gr.Progress()):
        """Compute the rollout, gradient or ViT maps of every generated token once (model passes), then render."""
        stored, settings = self.store.get(run_id), self._settings(*view_values)
        if settings.method != "attention":
            if not stored.is_single_image:
                raise gr.Error(f"The {settings.method} map works with a single image; generate with one image.")
            method_maps(self.slot, stored, settings, self.cfg.max_gradient_mb,
                        track=lambda steps, desc: progress.tqdm(steps, desc=desc))
        return self._render_with(stored, settings)

    # -- analysis ---------------------------------------------------------------------------------
    def _single(self, run_id) -> StoredRun:
        stored = self.store.get(run_id)
        if not stored.is_single_image:
            raise gr.Error("This view works on a single image. Generate with one image (no extra images or video) "
                           "to use it; the main picture and its caption cover several images and videos.")
        return stored

    @user_errors
    def analysis(self, run_id, metric, *view_values):
        """Layer × head matrix picture, text attention and the per-head gallery for the selected token."""
        stored, s = self._single(run_id), self._settings(*view_values)
        matrix = head_matrix(stored.run, s.step_idx, s.layers, s.heads)
        pieces = text_attention(stored.run, s.step_idx, s.layers, s.heads,
                                exclude_positions=system_positions(stored.run) if s.exclude_system else ())
        fits = s.num_maps <= self.cfg.max_gallery_maps
        tiles = head_gallery(stored.run, stored.image, s.step_idx, s.layers, s.heads, s.colormap) if fits else []
        top = max((p.weight for p in pieces if p.kind != "excluded"), default=1.0) or 1.0
        highlighted = [(p.text, round(p.weight / top, 3) if p.kind != "excluded" else None) for p in pieces]
        token = as_text(token_label(s.step_idx, stored.run.generated_tokens[s.step_idx]))
        shown = (f"**Token {token}** · layers {s.layers[0]}–{s.layers[1]} · heads {s.heads[0]}–{s.heads[1]} · "
                 f"{as_text(stored.run.model_id)}. ")                   # which result and token these views show
        note = analysis_note(stored.sinks(s.layers, s.heads), None if fits else (s.num_maps, self.cfg.max_gallery_maps),
                             shown)
        captions = [f"layer {layer} · head {head}" for layer in stored.run.layers_in(s.layers)
                    for head in range(s.heads[0], s.heads[1] + 1)]                  # 0-based, as on the page
        return (matrix_view(matrix[metric], stored.run.layers_in(s.layers), s.heads, metric), highlighted,
                [(tile, caption) for (_, tile), caption in zip(tiles, captions, strict=False)], note)

    def matrix_pick(self, matrix: dict | None):
        """A click on a matrix cell: (layer range, head range) of that one layer and head; the ranges'
        change redraws the map. A matrix drawn anew (nothing picked yet) changes nothing."""
        picked = (matrix or {}).get("picked")
        if not picked:
            return gr.skip(), gr.skip()
        layer, head = int(picked[0]), int(picked[1])
        return [layer, layer], [head, head]

    @user_errors
    def region_click(self, run_id, region, view, evt: gr.SelectData):
        """A click on the picture adds or removes that token cell; shows who attends to the region."""
        stored = self._single(run_id)
        zoom = screen_zoom(stored)
        x, y = evt.index[0] / zoom, evt.index[1] / zoom                   # in the drawn picture's pixels
        shown, (sx, sy) = stored.display(0)
        if view == "side_by_side" and x >= shown.size[0]:
            x -= shown.size[0] + SIDE_BY_SIDE_GAP                         # the overlay is the right half
        cell = cell_at(stored.run, x / sx, y / sy)                        # in the original image's pixels
        cells = {tuple(c) for c in region or []}
        if cell is not None:
            cells ^= {cell}
        return [list(c) for c in sorted(cells)], *self._region_views(stored, cells)

    @user_errors
    def render_region(self, run_id, region, *view_values):
        """The picture with the picked region's cells outlined (after a click on it)."""
        stored, settings = self.store.get(run_id), self._settings(*view_values)
        picture, _ = render(stored, settings)
        if stored.is_single_image:
            picture = outline_cells(stored, picture, [tuple(cell) for cell in region or []], settings.view)
        return on_screen(stored, picture)

    def region_clear(self):
        return [], pd.DataFrame({"step": [], "share": [], "token": []}), region_note(None, set(), None)

    def _region_views(self, stored: StoredRun, cells: set):
        if not cells:
            return self.region_clear()[1:]
        mask = np.zeros(stored.run.vision.grid_hw, dtype=bool)
        mask[tuple(np.array(sorted(cells)).T)] = True
        summary = region_to_text(stored.run, mask)
        table = pd.DataFrame({"step": step_labels(stored.run.num_steps), "share": summary["per_step"],
                              "token": [token_label(t, tok) for t, tok in enumerate(stored.run.generated_tokens)]})
        return table, region_note(stored.run, cells, summary["per_head"])

    @user_errors
    def lens(self, run_id, progress=gr.Progress()) -> tuple[str, str]:
        """Logit lens over the image's patches (a model pass), shown in a sandboxed frame and saved as HTML."""
        stored = self._single(run_id)
        progress(0, desc="Decoding every layer at every image patch")
        page = lens_page(self.slot, stored)
        path = self._kept(save_page(page, self.cfg.outputs_dir, "logit-lens"))
        frame = (f'<iframe title="Logit lens" sandbox="allow-scripts" style="width:100%;height:820px;border:0" '
                 f'srcdoc="{html.escape(page, quote=True)}"></iframe>')
        return frame, str(path)

    @user_errors
    def verify(self, run_id, *view_values, progress=gr.Progress()):
        """Deletion and insertion curves of the current map against a random order (model passes)."""
        stored, s = self._single(run_id), self._settings(*view_values)
        progress(0, desc="Blurring cells in map order and in a random order")
        result = verify_map(self.slot, stored, s)
        auc = result.summary()

        def plot(kind: str) -> gr.LinePlot:                             # map vs random order, AUCs in the legend
            names = {kind: f"map order (AUC {auc[kind]:.3f})",
                     f"random_{kind}": f"random order (AUC {auc[f'random_{kind}']:.3f})"}
            table = pd.DataFrame([{"fraction": float(f), "probability": float(p), "curve": name}
                                  for key, name in names.items()
                                  for f, p in zip(result.fractions, getattr(result, key), strict=True)])
            return gr.LinePlot(value=table, color_map=dict(zip(names.values(), VERIFY_COLORS, strict=True)))
        token = as_text(token_label(s.step_idx, stored.run.generated_tokens[s.step_idx]))
        return plot("deletion"), plot("insertion"), f"Token {token}: " + verify_note(auc)

    @user_errors
    def gallery_download(self, run_id, *view_values) -> str:
        stored, s = self._single(run_id), self._settings(*view_values)
        if s.num_maps > self.cfg.max_gallery_maps:
            raise gr.Error(f"The gallery holds at most {self.cfg.max_gallery_maps} layer × head maps "
                           f"(now {s.num_maps}); narrow the layer or head range.")
        tiles = head_gallery(stored.run, stored.image, s.step_idx, s.layers, s.heads, s.colormap)
        return str(self._kept(save_gallery_zip(tiles, self.cfg.outputs_dir, s.step_idx)))

    # -- downloads --------------------------------------------------------------------------------
    @user_errors
    def download_png(self, run_id, *view_values) -> str:
        settings = self._settings(*view_values)
        picture, _, _ = self._render_with(self.store.get(run_id), settings, screen=False)
        return str(self._kept(save_picture(picture, self.cfg.outputs_dir, settings.step_idx)))

    @user_errors
    def download_animation(self, run_id, *view_values) -> str:
        """An animated GIF of the map through the whole answer, with these view settings."""
        frames = animation_frames(self._single(run_id), self._settings(*view_values), self.cfg.animation_max_side)
        return str(self._kept(save_animation(frames, self.cfg.outputs_dir)))

    @user_errors
    def export_attention(self, run_id) -> list[str]:
        paths = export_run(self.store.get(run_id), self.cfg.outputs_dir)
        self._kept(*paths)
        return [str(path) for path in paths]

    def _kept(self, *paths: Path) -> Path:
        """Keep outputs/ under its size budget, oldest files first, never the ones just written."""
        prune_outputs(self.cfg.outputs_dir, self.cfg.outputs_max_mb, keep=list(paths))
        return paths[0]
