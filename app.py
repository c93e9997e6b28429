"""VLM Attention Explorer: the browser app. Layout, wiring and thin handlers only.

    python app.py [--model ID_OR_PATH] [--host 127.0.0.1] [--port 7860] [--share] [--auth user:pass]
                  [--device auto|cuda|cpu] [--dtype auto|bfloat16|float16|float32]
                  [--session-cache-mb 2048] [--store-device auto|cpu|cuda] [--store-budget-mb MB]
                  [--trust-remote-code]
                  [--allow-model-loading | --no-allow-model-loading] [--max-pixels-cap 16777216]
                  [--max-images 8]
                  [--ranges ranges.json]

The layout's parts are built in `ui/layout.py`, the handlers live in `ui/handlers.py`; this module puts
the page together by name and wires its events. The work happens in `pipeline.py`, `pictures/` and
the modules below them.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from attention_store import STORE_DEVICES
from config import AppConfig, ModelRanges
from exports import Janitor
from pipeline import ModelSlot, RunStore
from ui.components import BodyLimit, ClientAddress, LoginGuard, RequireLogin, inline_body_limit
from ui.controls import (
    MODEL_OUTPUTS,
    PAGE_OUTPUTS,
    VIEW_OUTPUTS,
    DerivedViews,
    Page,
    ViewControls,
    names,
    redraws,
)
from ui.handlers import Handlers
from ui.layout import (
    CHIPS_JS,
    CSS,
    analysis_tabs,
    default_model,
    inputs_column,
    knockout_panel,
    map_column,
    model_row,
    settings_column,
)
from ui.wiring import named_api_for, wire_analysis, wire_causal, wire_compare, wire_downloads, wire_region_and_box

logger = logging.getLogger("app")
GENERATIONS_WAITING = 4  # generations that may hold a worker at once (one runs; the others wait for the model)


def build_ui(cfg: AppConfig, slot: ModelSlot, store: RunStore, record: type = ViewControls) -> gr.Blocks:
    """The page: the layout's parts put into one `Page` by name, then wired (`wire`). `record`: the view
    controls' record (a test may add a control to it; the layout, wiring and API follow)."""
    # Gradio's cache of uploads and served pictures is cleaned every cache_max_age_s of files that old.
    with gr.Blocks(title="VLM Attention Explorer", delete_cache=(cfg.cache_max_age_s, cfg.cache_max_age_s)) as demo:
        parts = {
            "run_id": gr.State(None),
            "extra_state": gr.State([]),
            "video_state": gr.State(None),
            "region": gr.State([]),
            "corner": gr.State(None),
            "compare_a": gr.State(None),  # the result kept as A for a comparison
            "compare_shown": gr.State(False),
        }
        gr.Markdown(
            "**VLM Attention Explorer** · where in the image did the model look when it generated each "
            "token? Maps show the decoder's attention on the image tokens; every index is 0-based.",
            elem_id="title",
        )
        parts.update(model_row(cfg))
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=260):
                parts.update(inputs_column(cfg))
            with gr.Column(scale=4, min_width=360):
                parts.update(map_column())
                parts.update(knockout_panel())
            with gr.Column(scale=2, min_width=260):
                parts.update(settings_column(cfg, record))
        parts.update(analysis_tabs())
        view = record(**{name: parts.pop(name) for name in names(record)})
        derived = DerivedViews(**{name: parts.pop(name) for name in names(DerivedViews)})
        wire(demo, Page(view, derived, parts), Handlers(cfg, slot, store, record))
    return demo


def wire(demo: gr.Blocks, page: Page, h: Handlers) -> None:
    """Every event of the page, by component name. Events that run the model share one queue (limit 1),
    generations a few workers that wait for the model (a session's newest replaces its older ones);
    renders have their own, so sliders stay live while someone generates."""
    named_api = named_api_for(page)
    view_inputs, view_outputs = page.view_inputs, page.pick(VIEW_OUTPUTS)
    with_run = [page["run_id"], *view_inputs]
    ranges = [page["layer_range"], page["head_range"]]
    model_events = dict(concurrency_id="model", concurrency_limit=1)
    # Generations start at once, up to a few, and wait for the model's lock inside: a session's new
    # generation stops the one it still runs (or waits with), so one client never queues several.
    generate_events = dict(concurrency_id="generate", concurrency_limit=GENERATIONS_WAITING)
    render_events = dict(concurrency_id="render", concurrency_limit=4, show_progress="hidden")
    page_events = dict(api_name=False, concurrency_id="page", concurrency_limit=None, show_progress="hidden")

    # Extra media reach `generate` through session state, so the API keeps its one-image signature.
    page["extra_images"].change(
        lambda files: list(files or []), page["extra_images"], page["extra_state"], api_name=False, queue=False
    )
    # A video reaches generation through session state as uploaded; the page may show a playable copy.
    page["video"].upload(
        h.video_preview,
        page["video"],
        [page["video"], page["video_state"]],
        api_name=False,
        concurrency_id="video_preview",
        concurrency_limit=2,
        show_progress="minimal",
    )
    page["video"].clear(lambda: None, None, page["video_state"], api_name=False, queue=False)
    # Loading writes only to a hidden state, so a failure marks nothing on the page: the message
    # says why, the picker goes back to the loaded model, and the status and ranges stay.
    loading = page["load_btn"].click(
        named_api(h.load_model, ("model_id",), view=False, progress=True),
        [page["model_box"]],
        [page["load_result"]],
        api_name="load_model",
        **model_events,
    )
    loading.success(h.model_status, None, page.pick(MODEL_OUTPUTS), api_name=False, queue=False)
    loading.failure(h.loaded_model_id, None, [page["model_box"]], api_name=False, queue=False)
    demo.load(h.page_load, None, page.pick(PAGE_OUTPUTS), **page_events)
    page["status_timer"].tick(h.page_load, None, page.pick(PAGE_OUTPUTS), **page_events)

    generate_api = named_api(
        h.generate,
        ("image", "prompt", "max_new_tokens", "sample", "temperature", "top_p", "min_pixels", "max_pixels"),
        trailing=("extra_images", "video"),
        progress=True,
        request=True,
    )
    page["generate_btn"].click(h.stop_generation, None, None, queue=False, api_name=False, show_progress="hidden")
    page["generate_btn"].click(
        generate_api,
        [
            *page.pick(("image", "prompt", "max_new", "sampling", "temperature", "top_p", "min_px", "max_px")),
            *view_inputs,
            page["extra_state"],
            page["video_state"],
        ],
        page.pick(h.generate_outputs),
        api_name="generate",
        trigger_mode="always_last",
        **generate_events,
    )

    gr.on(
        [page[name].input for name in redraws(page.view)],
        named_api(h.render, ("run_id",)),
        with_run,
        view_outputs,
        api_name="render",
        trigger_mode="always_last",
        **render_events,
    )
    page["alpha"].input(h.render, with_run, view_outputs, api_name=False, trigger_mode="always_last", **render_events)
    for shown, lo, hi in (("layer_range", "layer_lo", "layer_hi"), ("head_range", "head_lo", "head_hi")):
        # In the browser: the range's [lo, hi] into the two values, then one redraw (the newest wins).
        page[shown].change(
            None,
            [page[shown]],
            [page[lo], page[hi]],
            js="(range) => [range[0], range[1]]",
            api_name=False,
            trigger_mode="always_last",
            queue=False,
        ).then(h.refresh, with_run, view_outputs, api_name=False, trigger_mode="always_last", **render_events)
    page["prompt_token"].input(
        h.pick_prompt_token, [page["prompt_token"]], [page["chips"]], api_name=False, queue=False
    )
    page["chips"].input(
        h.pick_chip,
        [page["chips"]],
        [page["token"], page["prompt_token"], page["tokens"]],
        api_name=False,
        queue=False,
    ).then(h.render, with_run, view_outputs, api_name=False, **render_events)
    page["token"].input(
        h.pick_chip,
        [page["token"]],
        [page["chips"], page["prompt_token"], page["tokens"]],
        api_name=False,
        queue=False,
    ).then(h.render, with_run, view_outputs, api_name=False, **render_events)
    page["word"].input(
        h.pick_word, [page["word"]], [page["tokens"], page["prompt_token"]], api_name=False, queue=False
    ).then(h.render, with_run, view_outputs, api_name=False, **render_events)
    gr.on(
        [page["tokens"].submit, page["tokens"].blur],
        h.pick_tokens,
        [page["tokens"]],
        [page["prompt_token"]],
        api_name=False,
        queue=False,
    ).then(h.render, with_run, view_outputs, api_name=False, trigger_mode="always_last", **render_events)
    page["contrast_prompt"].submit(
        named_api(h.contrast_toggle, ("run_id",)),
        with_run,
        view_outputs,
        api_name="contrast",
        trigger_mode="always_last",
        **model_events,
    )
    # A second pick while the first one computes is not dropped: it runs next, so the newest pick wins.
    page["relative"].input(
        h.relative_toggle, with_run, view_outputs, api_name=False, trigger_mode="always_last", **model_events
    )
    page["method"].input(
        named_api(h.method_select, ("run_id",), progress=True),
        with_run,
        view_outputs,
        api_name="method",
        trigger_mode="always_last",
        **model_events,
    )
    wire_region_and_box(page, h, with_run, view_outputs, render_events)
    wire_analysis(page, h, with_run, ranges, model_events, render_events)
    wire_downloads(page, h, with_run)
    wire_causal(page, h, model_events)
    wire_compare(page, h, render_events)


def parse_args(argv: list[str] | None = None) -> AppConfig:
    parser = argparse.ArgumentParser(description="VLM Attention Explorer")
    parser.add_argument("--model", help="hub id or local folder to load at start-up")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    parser.add_argument("--auth", help="user:pass protecting the page and the API")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument(
        "--session-cache-mb",
        type=int,
        default=AppConfig.session_cache_mb,
        help="memory for all sessions' results; least recently used are evicted",
    )
    parser.add_argument(
        "--store-device",
        default=AppConfig.store_device,
        choices=list(STORE_DEVICES),
        help="where a result's queries and keys stay, and its maps are computed: auto (on the model's GPU "
        "within --store-budget-mb, else on the host), cpu or cuda",
    )
    parser.add_argument(
        "--store-budget-mb",
        type=float,
        default=None,
        help="GPU memory all results' stores may hold together (default: half of what is free)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow checkpoints that ship their own Python code (runs that code)",
    )
    parser.add_argument(
        "--allow-model-loading",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let users load other models from the page (default: on when serving only on "
        "127.0.0.1 without --share, off otherwise)",
    )
    parser.add_argument(
        "--max-pixels-cap",
        type=int,
        default=AppConfig.max_pixels_cap,
        help="largest image-token budget (max pixels) a request may ask for",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=AppConfig.max_images,
        help="most images one prompt may hold (checked from their headers before any is decoded)",
    )
    parser.add_argument(
        "--ranges",
        help="a ranges.json from a study (batch.py --manifest ... --per-head --val-fraction F): "
        "its model starts with those layer and head ranges",
    )
    args = parser.parse_args(argv)
    if args.session_cache_mb <= 0:
        parser.error("--session-cache-mb must be a positive number of megabytes, e.g. 2048")
    if args.store_budget_mb is not None and args.store_budget_mb < 0:
        parser.error("--store-budget-mb must be 0 (every store on the host) or more megabytes, e.g. 4096")
    if args.max_images < 1:
        parser.error("--max-images must be at least 1, e.g. 8")
    if args.max_pixels_cap <= 0:
        parser.error("--max-pixels-cap must be a positive number of pixels, e.g. 16777216")
    local_only = args.host in ("127.0.0.1", "localhost", "::1") and not args.share
    allow_loading = local_only if args.allow_model_loading is None else args.allow_model_loading
    try:
        ranges = ModelRanges.read(args.ranges) if args.ranges else None
    except ValueError as err:
        parser.error(str(err))
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must look like user:password")
        auth = (user, password)
    return AppConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=auth,
        device=args.device,
        dtype=args.dtype,
        session_cache_mb=args.session_cache_mb,
        store_device=args.store_device,
        store_budget_mb=args.store_budget_mb,
        trust_remote_code=args.trust_remote_code,
        allow_model_loading=allow_loading,
        max_pixels_cap=args.max_pixels_cap,
        max_images=args.max_images,
        ranges=ranges,
    )


def start_loading(cfg: AppConfig, slot: ModelSlot) -> None:
    """Load the start-up model in the background so the page is served at once."""
    model_id = default_model(cfg)
    if not model_id:
        return
    slot.ready.clear()

    def load():
        try:
            slot.load(model_id, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.max_pixels_cap)
        except Exception as err:  # the page says why, and what to do
            logger.error("could not load %s: %s", model_id, err)
            slot.startup_failure = f"{model_id}: {err}"
        finally:
            slot.ready.set()

    threading.Thread(target=load, daemon=True).start()


def use_cache_dir(cfg: AppConfig) -> Path:
    """Gradio's cache for this app: `cfg.cache_dir`, unless GRADIO_TEMP_DIR names another (read before the
    page is built, since every component takes its cache folder when it is made). The app's own folder, so
    cleaning it never touches another program's files."""
    folder = Path(os.environ.setdefault("GRADIO_TEMP_DIR", str(cfg.cache_dir)))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cleaning_period(cfg: AppConfig) -> float:
    """Seconds between two cleanings: half the cache's age limit, from 5 s to 5 minutes."""
    return max(5.0, min(300.0, cfg.cache_max_age_s / 2))


def start_cleaning(cfg: AppConfig, cache_dir: Path, every_s: float | None = None) -> Janitor:
    """Clean Gradio's cache (by age and budget) and outputs/ (by budget) every `every_s` (by default
    `cleaning_period`), beside Gradio's own `delete_cache`, which misses files it did not record."""
    every = cleaning_period(cfg) if every_s is None else every_s
    jobs = [(cfg.outputs_dir, cfg.outputs_max_mb, None)]
    if cache_dir.resolve() == Path(cfg.cache_dir).resolve() or "gradio" in cache_dir.name.lower():
        jobs.append((cache_dir, cfg.cache_max_mb, cfg.cache_max_age_s))
    else:  # a folder someone else named may hold more than this app's files
        logger.warning("GRADIO_TEMP_DIR=%s is not the app's own cache folder; only Gradio cleans it", cache_dir)
    return Janitor(jobs, every).start()


def launch_options(cfg: AppConfig) -> dict:
    """How the server is exposed: only the app's own output folder is served, uploads are capped."""
    return dict(
        server_name=cfg.host,
        server_port=cfg.port,
        share=cfg.share,
        auth=LoginGuard(*cfg.auth) if cfg.auth else None,
        allowed_paths=[str(cfg.outputs_dir)],
        max_file_size=cfg.max_upload,
        app_kwargs={
            "middleware": [
                Middleware(ClientAddress),
                Middleware(RequireLogin),
                Middleware(BodyLimit, max_bytes=inline_body_limit(cfg.max_upload)),
            ]
        },
        ssr_mode=False,
        css=CSS,
        js=CHIPS_JS,
        theme=gr.themes.Soft(),
    )


def exposure_warnings(cfg: AppConfig) -> list[str]:
    """What the operator should hear about who can reach this server."""
    warnings = []
    if cfg.share and cfg.auth is None:
        warnings.append(
            "--share without --auth: anyone holding the public link can use this machine and its GPU. "
            "Add --auth user:password to protect it."
        )
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.auth is None:
        warnings.append(
            f"--host {cfg.host} without --auth: anyone who can reach this machine on port {cfg.port} "
            "can use it. Add --auth user:password to protect it."
        )
    return warnings


def port_in_use(host: str, port: int) -> bool:
    """Whether another program already listens on (host, port)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    if port_in_use(cfg.host, cfg.port):
        raise SystemExit(
            f"Port {cfg.port} on {cfg.host} is already in use (another copy of the app?). Stop that "
            f"program, or start this one on another port: python app.py --port {cfg.port + 1}"
        )
    for warning in exposure_warnings(cfg):
        logger.warning(warning)
    cfg.outputs_dir.mkdir(parents=True, exist_ok=True)
    start_cleaning(cfg, use_cache_dir(cfg))
    slot, store = ModelSlot(), RunStore(cfg.session_cache_mb)
    start_loading(cfg, slot)
    demo = build_ui(cfg, slot, store)
    demo.queue(default_concurrency_limit=1)
    demo.launch(**launch_options(cfg), prevent_thread_lock=True)
    if cfg.share:
        if demo.share_url:
            logger.info("Public link: %s", demo.share_url)
        else:
            logger.warning(
                "Could not create a public share link: the Gradio relay is not reachable from this "
                "machine. The app is still served locally at %s",
                demo.local_url,
            )
    demo.block_thread()


if __name__ == "__main__":
    main()
