"""The Gradio adapters: component values in, typed settings by name, one pipeline or view call out.

Each handler validates its input, builds a `ViewSettings` from the view controls by name (the
fields of `ui.controls.ViewControls`), calls one function of `pipeline.py` or `pictures/views.py`,
and lets `user_errors` turn the project's user errors into `gr.Error` messages. Threads and the model lock live in the
pipeline; the words shown to users live in the views.
"""

from __future__ import annotations

import html
import inspect
import logging
from pathlib import Path

import gradio as gr
import pandas as pd

from attention_processor import RAW_ATTENTION
from config import DEMO_MODEL_DIR, DEMO_RANGES, AppConfig, ModelRanges
from errors import UserError
from exports import ExportLane, export_run, prune_outputs, save_animation, save_picture
from families import frames_per_panel
from model_holder import MediaLimits
from pictures.stored_run import StoredRun, ViewSettings
from pictures.views import animation_frames, answer_words, as_text, on_screen, render, share_table, token_label
from pipeline import (
    ModelSlot,
    RunStore,
    contrast_baseline,
    method_maps,
    relative_baseline,
    stream_generation,
)
from ui.analysis_handlers import AnalysisHandlers
from ui.causal_handlers import CausalHandlers
from ui.compare_handlers import CompareHandlers
from ui.components import parse_box, parse_steps, session_of, user_errors, whole_number
from ui.controls import (
    MODEL_OUTPUTS,
    PAGE_OUTPUTS,
    VIEW_OUTPUTS,
    DerivedViews,
    ViewControls,
    by_name,
    defaults,
    generate_outputs,
    pack,
    resets,
)
from utils import image_header_size, load_image, load_video, playable_preview, video_header

logger = logging.getLogger(__name__)


def named_api(
    handler,
    leading: tuple[str, ...],
    view: bool = True,
    trailing: tuple[str, ...] = (),
    progress: bool = False,
    request: bool = False,
    select: bool = False,
    record: type = ViewControls,
):
    """`handler` (which takes its values positionally) under a signature that names every value, so API
    clients see `run_id, token, layer_lo, …` instead of `param_0, param_1, …`: the `leading` inputs, the
    view controls, then `trailing` inputs (session state, which API clients do not send). With
    `progress`, Gradio passes its progress tracker last; it reaches the handler as the `progress` keyword,
    and with `request` the request (for its session) after it, as the `request` keyword; with `select`,
    a click's event data, as the `evt` keyword."""
    params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in leading]
    if view:
        params += [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
            for name, default in defaults(record).items()
        ]
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in trailing]
    if progress:
        params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    if request:
        params.append(
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request)
        )
    if select:
        params.append(
            inspect.Parameter("evt", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.SelectData)
        )
    special = [name for name, wanted in (("progress", progress), ("request", request), ("evt", select)) if wanted]

    def split(args: tuple) -> tuple[tuple, dict]:
        if not special:
            return args, {}
        return args[: -len(special)], dict(zip(special, args[-len(special) :], strict=True))

    if inspect.isgeneratorfunction(handler):

        def forward(*args):
            positional, keywords = split(args)
            yield from handler(*positional, **keywords)
    else:

        def forward(*args):
            positional, keywords = split(args)
            return handler(*positional, **keywords)

    forward.__signature__ = inspect.Signature(params)
    forward.__annotations__ = {
        **({"request": gr.Request} if request else {}),
        **({"evt": gr.SelectData} if select else {}),
    }
    forward.__name__ = forward.__qualname__ = getattr(handler, "__name__", "handler")
    return forward


def recommended_ranges(
    model_id: str, layer_max: int, head_max: int, chosen: ModelRanges | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Start-up slider ranges: those of `--ranges` when they are this model's and fit it, the demo model's
    measured best, otherwise everything."""
    if chosen is not None and chosen.fits(model_id):
        if chosen.layers[1] <= layer_max and chosen.heads[1] <= head_max:
            return chosen.layers, chosen.heads
        logger.warning(
            "--ranges %s-%s × %s-%s do not fit %s (layers 0-%d, heads 0-%d); using all",
            *chosen.layers,
            *chosen.heads,
            model_id,
            layer_max,
            head_max,
        )
    if Path(model_id).resolve() == DEMO_MODEL_DIR.resolve():
        return DEMO_RANGES
    return (0, layer_max), (0, head_max)


class Handlers(AnalysisHandlers, CausalHandlers, CompareHandlers):
    """Event handlers. View values arrive as wired, in `ViewControls` order, and are keyed by name at once;
    several outputs go back by name through `controls.pack`."""

    def __init__(self, cfg: AppConfig, slot: ModelSlot, store: RunStore, record: type = ViewControls):
        self.cfg, self.slot, self.store = cfg, slot, store
        self.exports = ExportLane(cfg.export_workers)  # downloads beside the renders, which come first
        self.record, self.generate_outputs = record, generate_outputs(record)  # the view controls, as wired

    # -- model ------------------------------------------------------------------------------------
    def model_status(self) -> tuple:
        """MODEL_OUTPUTS: the status line, the layer and head ranges spanning the loaded model, set to its
        defaults, and the video input, shown only for a model that takes video."""
        holder = self.slot.holder
        if holder is None:
            failed = self.slot.startup_failure
            status = (
                "**No model loaded.** Pick one and press Load."
                if not failed
                else f"**The start-up model did not load.** {as_text(failed)} Pick a model and press Load, or "
                "restart the app with another `--model` (or `--device cpu` on a machine without a GPU)."
            )
            return pack(
                MODEL_OUTPUTS,
                status=status,
                layer_range=gr.HTML(value=[0, 0], maximum=0),
                head_range=gr.HTML(value=[0, 0], maximum=0),
                video=gr.Video(visible=False),
            )
        layer_max, head_max = holder.num_layers - 1, holder.num_heads - 1
        layers, heads = recommended_ranges(holder.model_id, layer_max, head_max, self.cfg.ranges)
        return pack(
            MODEL_OUTPUTS,
            status=f"**Loaded:** {as_text(holder.describe())}",
            layer_range=gr.HTML(value=list(layers), maximum=layer_max),
            head_range=gr.HTML(value=list(heads), maximum=head_max),
            video=gr.Video(visible=holder.takes_video),
        )

    @user_errors
    def load_model(self, model_id: str, progress=gr.Progress(track_tqdm=True)) -> str:
        """Load a model for everyone; returns the status line. A failure changes nothing (the message
        says why); the page then puts the picker back on the loaded model (`loaded_model_id`)."""
        if not self.cfg.allow_model_loading:
            raise gr.Error(
                "Loading other models is turned off on this server; its operator chose the model. "
                "Start the app with --allow-model-loading to change that."
            )
        if not model_id or not str(model_id).strip():
            raise gr.Error("Type a hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct) or a local folder, then press Load.")
        progress(0, desc=f"Loading {model_id}")
        self.slot.load(
            model_id.strip(), self.cfg.device, self.cfg.dtype, self.cfg.trust_remote_code, self.cfg.max_pixels_cap
        )
        return self.model_status()[0]

    def loaded_model_id(self):
        """The picker's value after a failed load: the model still loaded (the typed id is dropped)."""
        holder = self.slot.holder
        return gr.Dropdown(value=holder.model_id) if holder is not None else gr.skip()

    def page_load(self) -> tuple:
        """A new page's model status, at once. While the start-up model loads, a note and an active timer
        that asks again (a page load never waits for the load, so it never holds a worker)."""
        if not self.slot.ready.is_set():
            return pack(
                PAGE_OUTPUTS,
                status="**Loading the start-up model…** This page updates when it is ready.",
                status_timer=gr.Timer(active=True),
            )
        status = dict(zip(MODEL_OUTPUTS, self.model_status(), strict=True))
        return pack(PAGE_OUTPUTS, **status, status_timer=gr.Timer(active=False))

    # -- generation -------------------------------------------------------------------------------
    def _media(self, image_path, extra_paths, video_path, check) -> tuple[list, list | None, list]:
        """(images, video frames or None, one picture per map panel) from the uploads; `check(sizes, video)`
        sees their headers first (`ModelHolder.check_media`), before anything is decoded."""
        if video_path:
            if image_path or extra_paths:
                raise gr.Error("Give either images or a video, not both: clear one of them.")
            check([], video_header(video_path))
            frames = load_video(video_path)
            return [], frames, frames[:: frames_per_panel(self.slot.get().model.config)]
        if not image_path:
            raise gr.Error("No image. Upload an image first.")
        paths = [image_path, *(extra_paths or [])]
        check([image_header_size(path, self.cfg.max_image_pixels) for path in paths], None)
        images = [load_image(path, self.cfg.max_image_pixels) for path in paths]
        return images, None, images

    @user_errors
    def generate(
        self,
        image_path,
        prompt,
        max_new_tokens,
        sampling,
        temperature,
        top_p,
        min_pixels,
        max_pixels,
        *values,
        progress=gr.Progress(),
        request: gr.Request | None = None,
    ):
        """values: the view controls, then the extra images and the video (both optional).
        A session's new generation stops the one it still runs (see `stop_generation`)."""
        view_values, (extra_paths, video_path) = values[:-2], values[-2:]
        if not prompt or not prompt.strip():
            raise gr.Error("The prompt is empty. Type a question or instruction about the image.")
        if len(prompt) > self.cfg.max_prompt_chars:
            raise gr.Error(
                f"The prompt has {len(prompt)} characters; this server accepts up to "
                f"{self.cfg.max_prompt_chars}. Shorten it and try again."
            )
        holder = self.slot.get()  # a clear message when none is loaded
        sample = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p)) if sampling else {}
        max_new_tokens = whole_number(max_new_tokens, "Max new tokens", minimum=1)
        budget = dict(
            min_pixels=whole_number(min_pixels or 0, "Min pixels") or None,
            max_pixels=whole_number(max_pixels or 0, "Max pixels") or None,
        )
        limits = MediaLimits(self.cfg.max_images, self.cfg.max_image_pixels)

        def check(sizes, video):
            holder.check_media(
                sizes,
                prompt,
                int(max_new_tokens),
                **budget,
                max_capture_mb=self.cfg.session_cache_mb,
                video=video,
                limits=limits,
            )

        images, frames, panels = self._media(image_path, extra_paths, video_path, check)
        text, run = "", None
        session = session_of(request)
        cancel = self.slot.begin(session)
        stream = stream_generation(
            self.slot,
            images,
            prompt,
            int(max_new_tokens),
            video=frames,
            max_capture_mb=self.cfg.session_cache_mb,
            cancel=cancel,
            store_device=self.cfg.store_device,
            store_budget_mb=self.cfg.store_budget_mb,
            limits=limits,
            **sample,
            **budget,
        )
        try:
            for count, item in enumerate(stream, start=1):
                if isinstance(item, str):
                    text = item
                    progress(min(count / int(max_new_tokens), 1.0), desc="Generating")
                    yield pack(self.generate_outputs, answer=text)
                else:
                    run = item
        except (gr.Error, UserError, MemoryError):
            raise  # messages, through `user_errors`
        except Exception as err:  # a bug: logged, and said plainly
            logger.exception("generation failed")
            raise gr.Error(
                f"Generation failed: {html.escape(str(err), quote=False)}. This is an internal error; "
                "the server keeps running. Try again, and report this if it repeats."
            ) from err
        finally:
            self.slot.end(session, cancel)
        stored = StoredRun(run, images=panels)
        run_id, run = self.store.put(stored), stored.run
        unknown = self.slot.get().unknown_words(prompt)
        if unknown:
            text += (
                f"\n\n⚠ Unknown to this model (it read them as <unk>): {', '.join(unknown)}. The answer may "
                "not follow the question; see the words it knows below the examples."
            )
        choices = [(token_label(t, tok), t) for t, tok in enumerate(run.generated_tokens)]
        words = [
            (f"{word} (tokens {', '.join(map(str, steps))})", ", ".join(map(str, steps)))
            for word, steps in answer_words(run.generated_tokens)
        ]
        prompt_choices = [(token_label(pos, run.prompt_tokens[pos]), pos) for pos in run.prompt_positions]
        # A new result starts without the options that need extra work (baseline) or one image (sinks):
        # each view control with a `reset` value takes it, and every derived view is cleared.
        fresh = resets(self.record)
        picture, caption, plot = self._render_with(stored, self._settings_from({**self._view(view_values), **fresh}))
        yield pack(
            self.generate_outputs,
            **{
                **fresh,
                **resets(DerivedViews),
                "run_id": run_id,
                "answer": text,
                "token": gr.Dropdown(choices=choices, value=fresh["token"]),
                "chips": gr.Radio(choices=choices, value=fresh["token"]),
                "picture": picture,
                "caption": caption,
                "plot": plot,
                "prompt_token": gr.Dropdown(
                    choices=prompt_choices, value=fresh["prompt_token"], allow_custom_value=True
                ),
                "region": [],
                "files": [],
                "word": gr.Dropdown(choices=words, value=None),
                "contrast_token": gr.Dropdown(choices=choices, value=None),
            },
        )

    def video_preview(self, path):
        """An uploaded video: (what the page shows, what generation reads). A video the browser cannot play
        is shown as a small WebM copy, and the model still reads the original."""
        if not path:
            return gr.skip(), None
        preview = playable_preview(path, Path(path).parent)
        return (str(preview) if preview is not None else gr.skip()), path

    def stop_generation(self, request: gr.Request | None = None) -> None:
        """Stop this session's running generation at its next token (wired, unqueued, to Generate, so
        asking again never waits behind one's own old answer)."""
        self.slot.stop(session_of(request))

    # -- views ------------------------------------------------------------------------------------
    def _view(self, view_values: tuple) -> dict:
        """The view controls' values, as wired (in `ViewControls` order; trailing ones may be left out), by name."""
        return by_name(self.record, view_values)

    def _settings(self, *view_values) -> ViewSettings:
        """The view controls' values, as wired, as one ViewSettings."""
        return self._settings_from(self._view(view_values))

    def _settings_from(self, v: dict) -> ViewSettings:
        """The view controls' values by name as one ViewSettings; ranges left out are the page's own."""
        layers, heads = self._default_ranges()  # what the page starts with
        layers = tuple(
            whole_number(given, name) if given is not None else default
            for name, given, default in zip(
                ("Layer from", "Layer to"), (v["layer_lo"], v["layer_hi"]), layers, strict=True
            )
        )
        heads = tuple(
            whole_number(given, name) if given is not None else default
            for name, given, default in zip(("Head from", "Head to"), (v["head_lo"], v["head_hi"]), heads, strict=True)
        )
        steps = parse_steps(v["tokens"], "Combine tokens") or parse_steps(v["token"], "Token") or (0,)
        contrast = parse_steps(v["contrast_token"], "Contrast token")
        if len(contrast) > 1:
            raise gr.Error("Contrast with one other token: pick a single one.")
        return ViewSettings(
            step_idx=steps[0],
            steps=steps if len(steps) > 1 else (),
            combine=v["combine"] or "sum",
            contrast_step=contrast[0] if contrast else None,
            contrast_prompt=str(v["contrast_prompt"] or "").strip()[: self.cfg.max_prompt_chars],
            parts=bool(v["parts"]),
            layers=layers,
            heads=heads,
            reduce=v["aggregation"],
            normalization=v["normalization"],
            percentile=self.cfg.percentile,
            colormap=v["colormap"],
            alpha=float(v["alpha"]),
            view=v["view"],
            grid=bool(v["grid"]),
            renormalize=bool(v["renormalize"]),
            mask_sinks=bool(v["mask_sinks"]),
            relative=bool(v["relative"]),
            prompt_pos=None if v["prompt_token"] in (None, "") else whole_number(v["prompt_token"], "Prompt token"),
            exclude_system=bool(v["exclude_system"]),
            method=v["method"] or RAW_ATTENTION,
            target_box=parse_box(v["target_box"]),
            interpolation="bilinear" if v["smooth"] else "nearest",
        )

    def _default_ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The ranges the page starts with for the loaded model (API calls that leave them out get these)."""
        holder = self.slot.holder
        if holder is None:
            return (0, 0), (0, 0)
        return recommended_ranges(holder.model_id, holder.num_layers - 1, holder.num_heads - 1, self.cfg.ranges)

    def _render_with(self, stored: StoredRun, settings: ViewSettings, screen: bool = True):
        """(picture, caption, share table); `screen`: the picture enlarged for display (small images)."""
        with self.exports.foreground():
            picture, caption = render(stored, settings)
            picture = on_screen(stored, picture) if screen else picture
            table = share_table(stored, settings.layers, settings.heads, settings.step_idx, settings.exclude_system)
        return picture, caption, pd.DataFrame(table)

    @user_errors
    def render(self, run_id, *view_values):
        """The views for these settings. Another method's maps not computed yet for them (a token or range
        picked while a method was still computing, or the ViT map's ranges moved) are computed first,
        after the pass in progress, so the picture always shows the method the page shows."""
        stored, settings = self.store.get(run_id), self._settings(*view_values)
        self._check_tokens(stored, settings)
        if self._wants_maps(stored, settings):
            method_maps(self.slot, stored, settings, self.cfg.max_gradient_mb)  # cached: no model pass
        return self._render_with(stored, settings)

    @staticmethod
    def _wants_maps(stored: StoredRun, settings: ViewSettings) -> bool:
        """Whether these settings draw another method's maps (computed first if they are not yet; for a
        prompt token, a method that cannot map one says which can)."""
        return settings.method != RAW_ATTENTION and not settings.relative and stored.is_single_image

    @staticmethod
    def _check_tokens(stored: StoredRun, settings: ViewSettings) -> None:
        """Every picked generated token is one of this answer's."""
        last = stored.run.num_steps - 1
        wrong = [t for t in settings.tokens if t > last]
        if wrong:
            raise gr.Error(
                f"Token {wrong[0]} is out of range: this answer has tokens 0..{last}; pick tokens from the list."
            )

    @user_errors
    def refresh(self, run_id, *view_values):
        """`render` after the ranges moved; nothing to draw (no result yet) leaves the views as they are."""
        if run_id is None:
            return pack(VIEW_OUTPUTS)
        try:
            return self.render(run_id, *view_values)
        except gr.Error:  # ranges of a newly loaded model over an older model's result
            if self.slot.holder is not None and self.store.get(run_id).run.model_id != self.slot.holder.model_id:
                return pack(VIEW_OUTPUTS)
            raise

    def pick_chip(self, step_idx):
        """Keep the dropdown and the chips in step; a generated token replaces a picked prompt token and
        several combined ones."""
        return step_idx, "", ""

    def pick_word(self, steps):
        """A word of the answer: its tokens go to 'Combine tokens' (a picked prompt token is dropped)."""
        return (steps or "", "") if steps else (gr.skip(), gr.skip())

    def pick_tokens(self, tokens):
        """Typed or shift-clicked tokens replace a picked prompt token."""
        return "" if tokens else gr.skip()

    @user_errors
    def contrast_toggle(self, run_id, *view_values):
        """Compute the other prompt's map on this image once (a model call), then render."""
        stored, settings = self.store.get(run_id), self._settings(*view_values)
        if settings.contrast_prompt:
            if not stored.is_single_image:
                raise gr.Error("The contrast with another prompt works with a single image; generate with one image.")
            contrast_baseline(self.slot, stored, settings.contrast_prompt)
        return self.render(run_id, *view_values)

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
        self._check_tokens(stored, settings)
        if settings.method != RAW_ATTENTION:
            if not stored.is_single_image:
                raise gr.Error(f"The {settings.method} map works with a single image; generate with one image.")
            method_maps(
                self.slot,
                stored,
                settings,
                self.cfg.max_gradient_mb,
                track=lambda steps, desc: progress.tqdm(steps, desc=desc),
            )
        return self._render_with(stored, settings)

    # -- downloads --------------------------------------------------------------------------------
    @user_errors
    def download_png(self, run_id, *view_values, request: gr.Request | None = None) -> str:
        settings = self._settings(*view_values)
        stored = self.store.get(run_id)
        with self.exports.export(session_of(request)):
            picture, _, _ = self._render_with(stored, settings, screen=False)
            return str(self._kept(save_picture(picture, self.cfg.outputs_dir, settings.step_idx)))

    @user_errors
    def download_animation(self, run_id, *view_values, request: gr.Request | None = None) -> str:
        """An animated GIF of the map through the whole answer, with these view settings (at most
        `animation_max_frames` frames), written in the export lane, a frame at a time."""
        stored, settings = self._single(run_id), self._settings(*view_values)
        with self.exports.export(session_of(request)) as lane:
            frames = animation_frames(stored, settings, self.cfg.animation_max_side, self.cfg.animation_max_frames)
            return str(self._kept(save_animation(lane.paced(frames), self.cfg.outputs_dir)))

    @user_errors
    def export_attention(self, run_id, request: gr.Request | None = None) -> list[str]:
        stored = self.store.get(run_id)
        with self.exports.export(session_of(request)) as lane:
            paths = export_run(stored, self.cfg.outputs_dir, pace=lane.paced)
        self._kept(*paths)
        return [str(path) for path in paths]

    def _kept(self, *paths: Path) -> Path:
        """Keep outputs/ under its size budget, oldest files first, never the ones just written."""
        prune_outputs(self.cfg.outputs_dir, self.cfg.outputs_max_mb, keep=list(paths))
        return paths[0]
