"""VLM Attention Explorer: the browser app. Layout, wiring and thin handlers only.

    python app.py [--model ID_OR_PATH] [--host 127.0.0.1] [--port 7860] [--share] [--auth user:pass]
                  [--device auto|cuda|cpu] [--dtype auto|bfloat16|float16|float32]
                  [--session-cache-mb 2048] [--trust-remote-code]
                  [--allow-model-loading | --no-allow-model-loading] [--max-pixels-cap 16777216]
                  [--ranges ranges.json]

The work happens in `pipeline.py`, `views.py` and the modules below them.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import threading

import gradio as gr
import torch

from attention_processor import REDUCTIONS
from components import LoginGuard, image_upload, matrix_heatmap, range_slider, upload_bytes
from config import DEMO_MODEL_DIR, EXAMPLES_DIR, GPU_DEFAULT_MODEL, AppConfig, ModelRanges
from demo_data import guide as demo_guide
from handlers import Handlers, named_api
from pipeline import ModelSlot, RunStore
from views import DISPLAY_NORMALIZATIONS, METHODS, VIEWS
from visualization import COLORMAPS

logger = logging.getLogger("app")
CSS = """
#token-chips .wrap { gap: 4px !important; max-height: 5.4em; overflow-y: auto; }
#title p { margin: 0 !important; }
#token-chips label { padding: 2px 8px !important; min-width: 0 !important; font-family: monospace; }
.range-row { gap: 6px !important; }
"""


def default_model(cfg: AppConfig) -> str | None:
    """--model if given; else a real model on a GPU and the bundled demo model on a CPU."""
    if cfg.model:
        return cfg.model
    if torch.cuda.is_available():
        return GPU_DEFAULT_MODEL
    return str(DEMO_MODEL_DIR) if (DEMO_MODEL_DIR / "config.json").exists() else None


def example_rows() -> list[list[str]]:
    """[image path, question] pairs shipped in examples/ (empty when the folder is missing)."""
    listing = EXAMPLES_DIR / "examples.json"
    if not listing.exists():
        return []
    return [[str(EXAMPLES_DIR / name), question] for name, question, _ in json.loads(listing.read_text())]


def model_choices(cfg: AppConfig) -> list[str]:
    demo = [str(DEMO_MODEL_DIR)] if (DEMO_MODEL_DIR / "config.json").exists() else []
    return demo + list(cfg.presets)



def _range(label: str, elem_id: str) -> tuple[gr.HTML, gr.Number, gr.Number]:
    """A two-handle range (what the user moves) and the two plain values it keeps in step, hidden: the
    API's `{layers,heads}_{lo,hi}` parameters and every handler read those."""
    shown = range_slider(label, elem_id, maximum=0)
    # Empty until the range sets them, so an API call that leaves them out gets the page's own ranges.
    lo = gr.Number(None, precision=0, label=f"{label} from", elem_id=f"{elem_id}-lo", visible="hidden")
    hi = gr.Number(None, precision=0, label=f"{label} to", elem_id=f"{elem_id}-hi", visible="hidden")
    return shown, lo, hi


def build_analysis() -> dict[str, gr.components.Component]:
    """The analysis views for the selected token and ranges, refreshed on demand."""
    with gr.Tabs(elem_id="analysis"):
        with gr.Tab("Layers × heads", elem_id="tab-matrix"):
            with gr.Row():
                metric = gr.Radio(["share", "entropy"], value="share", elem_id="matrix-metric",
                                  label="Matrix: attention share on the image, or spatial entropy of each head's map")
                show = gr.Button("Show analysis for the selected token", elem_id="analysis-btn")
            with gr.Row():
                matrix = matrix_heatmap("Layer × head, 0-based (click a cell to show that head's map)",
                                        "head-matrix")
                text = gr.HighlightedText(label="What the token attends to in the text (with 'Exclude BOS and "
                                          "system prompt', those are shown unhighlighted)", elem_id="text-attention")
            note = gr.Markdown("", elem_id="analysis-note")
        with gr.Tab("Per-head gallery", elem_id="tab-gallery"):
            gallery = gr.Gallery(label="Per-head maps (layer and head 0-based)", columns=8, height=420,
                                 elem_id="head-gallery")
            zip_btn = gr.Button("Download the gallery (ZIP; files named S{step}_L{layer}_H{head}, 1-based)",
                                elem_id="gallery-zip")
        with gr.Tab("Region → text", elem_id="tab-region"):
            gr.Markdown("Click token cells on the attention picture to build a region (click again to remove "
                        "a cell); the picked cells are outlined on the picture.")
            with gr.Row():
                region_plot = gr.BarPlot(x="step", y="share", tooltip=["token", "share"], height=220, sort="x",
                                         title="Attention share on the region per generated token", y_lim=[0, 1],
                                         elem_id="region-plot")
                with gr.Column():
                    region_note = gr.Markdown("Click the picture to pick token cells.", elem_id="region-note")
                    region_clear = gr.Button("Clear region", elem_id="region-clear")
        with gr.Tab("Verify", elem_id="tab-verify"):
            with gr.Row():
                verify_btn = gr.Button("Verify this map: delete / insert cells in map order vs a random order",
                                       elem_id="verify-btn")
                verify_note = gr.Markdown("", elem_id="verify-note")
            with gr.Row():
                verify_plot = gr.LinePlot(x="fraction", y="probability", color="curve", height=260,
                                          elem_id="verify-plot", y_lim=[0, 1],
                                          title="Deleting cells: the token's probability (lower AUC = better map)")
                verify_insertion = gr.LinePlot(x="fraction", y="probability", color="curve", height=260,
                                               elem_id="verify-plot-insertion", y_lim=[0, 1],
                                               title="Inserting cells: the token's probability (higher AUC = better)")
        with gr.Tab("Logit lens", elem_id="tab-lens"):
            with gr.Row():
                lens_btn = gr.Button("Logit lens: decode every layer at every image patch", elem_id="lens-btn")
                lens_file = gr.File(label="Logit lens page (HTML, works offline)", interactive=False, height=80)
            lens_view = gr.HTML("", elem_id="logit-lens")
    return {"metric": metric, "show": show, "matrix": matrix, "text": text, "gallery": gallery, "note": note,
            "zip": zip_btn, "region_plot": region_plot, "region_note": region_note, "region_clear": region_clear,
            "lens_btn": lens_btn, "lens_view": lens_view, "lens_file": lens_file, "verify_btn": verify_btn,
            "verify_plot": verify_plot, "verify_insertion": verify_insertion, "verify_note": verify_note}


# Views computed from one result; a new result clears them (handlers.Handlers.generate).
DERIVED_VIEWS = ("matrix", "text", "gallery", "note", "lens_view", "lens_file", "verify_plot", "verify_insertion",
                 "verify_note",
                 "region_plot", "region_note")


def build_ui(cfg: AppConfig, slot: ModelSlot, store: RunStore) -> gr.Blocks:
    h = Handlers(cfg, slot, store)
    # Gradio's cache of uploads and served pictures is cleaned every cache_max_age_s of files that old.
    with gr.Blocks(title="VLM Attention Explorer", delete_cache=(cfg.cache_max_age_s, cfg.cache_max_age_s)) as demo:
        run_id = gr.State(None)
        gr.Markdown("**VLM Attention Explorer** · where in the image did the model look when it generated each "
                    "token? Maps show the decoder's attention on the image tokens; every index is 0-based.",
                    elem_id="title")
        with gr.Row(equal_height=False, elem_id="model-row"):
            model_box = gr.Dropdown(model_choices(cfg), value=default_model(cfg), allow_custom_value=True,
                                    label="Model (preset, hub id or local folder)" if cfg.allow_model_loading else
                                    "Model (this server's operator turned loading other models off)",
                                    interactive=cfg.allow_model_loading, elem_id="model-id", scale=4,
                                    show_label=not cfg.allow_model_loading, container=not cfg.allow_model_loading)
            load_btn = gr.Button("Load", elem_id="load-btn", scale=1, interactive=cfg.allow_model_loading,
                                 size="md")
        status = gr.Markdown("Starting…", elem_id="model-status")

        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=260):
                image = image_upload(upload_bytes(cfg.max_upload), image_mode=None, label="Image",
                                     elem_id="image-input", height=240)
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="e.g. What color is the circle?")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                answer = gr.Textbox(label="Answer", lines=2, interactive=False, elem_id="answer")
                with gr.Accordion("Generation settings", open=False):
                    max_new = gr.Slider(1, 512, value=cfg.max_new_tokens, step=1, label="Max new tokens")
                    sampling = gr.Checkbox(False, label="Sample (off = greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                    with gr.Row():
                        min_px = gr.Number(0, label="Min pixels (Qwen, 0 = model default)", precision=0)
                        max_px = gr.Number(0, label="Max pixels (Qwen, 0 = model default)", precision=0)
                with gr.Accordion("More images, or a video (video: Qwen, GLM, InternVL, OneVision, SmolVLM)",
                                  open=False):
                    extra_images = gr.File(file_count="multiple", file_types=["image"], elem_id="extra-images",
                                           label="More images, after the first one, in this order")
                    video = gr.Video(label="A video instead of images", elem_id="video-input", height=200)
                examples = example_rows()
                if examples:
                    gr.Examples(examples, [image, prompt], label="Examples for the demo model", examples_per_page=6)
                    gr.Markdown(demo_guide(), elem_id="demo-guide")
            with gr.Column(scale=4, min_width=360):
                chips = gr.Radio([], label="Tokens", elem_id="token-chips", show_label=False)
                picture = gr.Image(type="pil", format="jpeg", label="Attention", interactive=False,
                                   elem_id="overlay", height=400)
                caption = gr.Markdown("", elem_id="caption")
                with gr.Row():
                    token = gr.Dropdown([], label="Generated token (index: token)", elem_id="token-dropdown",
                                        allow_custom_value=True)
                    prompt_token = gr.Dropdown([], value="", label="…or a prompt token (what that word looks at)",
                                               elem_id="prompt-token-dropdown", allow_custom_value=True)
                plot = gr.BarPlot(x="step", y="share", color="selected", tooltip=["token", "share"], sort="x",
                                  title="Attention share on the image per generated token", y_lim=[0, 1],
                                  elem_id="share-plot", height=220,
                                  color_map={"selected": "#d62728", "other": "#b8c4d6"})
            with gr.Column(scale=2, min_width=260):
                layer_range, layer_lo, layer_hi = _range("Layers", "layer-range")
                head_range, head_lo, head_hi = _range("Heads", "head-range")
                method = gr.Radio(list(METHODS), value="attention", elem_id="method",
                                  label="Map: raw attention (the ranges apply), rollout, gradient-weighted, or "
                                        "pushed through the vision encoder (vit); the last three on demand")
                with gr.Row():
                    aggregation = gr.Dropdown(list(REDUCTIONS), value=cfg.aggregation, label="Aggregation",
                                              elem_id="aggregation", min_width=100)
                    normalization = gr.Dropdown(list(DISPLAY_NORMALIZATIONS), value=cfg.normalization,
                                                label="Normalisation", elem_id="normalization", min_width=100)
                with gr.Row():
                    colormap = gr.Dropdown(list(COLORMAPS), value=cfg.colormap, label="Colormap",
                                           elem_id="colormap", min_width=100)
                    alpha = gr.Slider(0, 1, value=cfg.alpha, step=0.05, label="Alpha", elem_id="alpha",
                                      min_width=100)
                view = gr.Radio(list(VIEWS), value=cfg.view, label="View", elem_id="view")
                with gr.Row():
                    target_box = gr.Textbox("", label="Target box: x0, y0, x1, y1 in image pixels",
                                            placeholder="type it, or tick the box and click two corners",
                                            elem_id="target-box", min_width=160, scale=3)
                    box_mode = gr.Checkbox(False, label="Clicks draw it", elem_id="box-mode", min_width=80,
                                           scale=1)
                with gr.Accordion("More display options", open=False):
                    grid = gr.Checkbox(False, label="Show token grid", elem_id="grid")
                    renormalize = gr.Checkbox(False, label="Renormalise within the image", elem_id="renormalize")
                    mask_sinks = gr.Checkbox(False, label="Mask sink cells", elem_id="mask-sinks")
                    relative = gr.Checkbox(False, label="Relative to a generic prompt", elem_id="relative")
                    exclude_system = gr.Checkbox(False, label="Exclude BOS and system prompt",
                                                 elem_id="exclude-system")
                with gr.Row():
                    png_btn = gr.Button("Picture (PNG)", elem_id="png-btn", min_width=80)
                    gif_btn = gr.Button("Animation (GIF)", elem_id="gif-btn", min_width=80)
                    export_btn = gr.Button("Attention (safetensors)", elem_id="export-btn", min_width=80)
                files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
        analysis = build_analysis()

        view_inputs = [token, layer_lo, layer_hi, head_lo, head_hi, aggregation, normalization, colormap, alpha,
                       view, grid, renormalize, mask_sinks, relative, prompt_token, exclude_system, method,
                       target_box]
        ranges = [layer_range, head_range]
        view_outputs = [picture, caption, plot]
        model_events = dict(concurrency_id="model", concurrency_limit=1)
        render_events = dict(concurrency_id="render", concurrency_limit=4, show_progress="hidden")

        # Extra media reach `generate` through session state, so the API keeps its one-image signature.
        extra_state, video_state, region, corner = gr.State([]), gr.State(None), gr.State([]), gr.State(None)
        extra_images.change(lambda files: list(files or []), extra_images, extra_state, api_name=False, queue=False)
        video.change(lambda path: path or None, video, video_state, api_name=False, queue=False)
        # Loading writes only to a hidden state, so a failure marks nothing on the page: the message
        # says why, the picker goes back to the loaded model, and the status and ranges stay.
        load_result = gr.Textbox(visible="hidden", elem_id="load-result")       # the API's answer
        loading = load_btn.click(named_api(h.load_model, ("model_id",), view=False, progress=True), [model_box],
                                 [load_result], api_name="load_model", **model_events)
        loading.success(h.model_status, None, [status, *ranges, video], api_name=False, queue=False)
        loading.failure(h.loaded_model_id, None, [model_box], api_name=False, queue=False)
        status_timer = gr.Timer(2.0, active=False)
        page_events = dict(api_name=False, concurrency_id="page", concurrency_limit=None, show_progress="hidden")
        demo.load(h.page_load, None, [status, *ranges, video, status_timer], **page_events)
        status_timer.tick(h.page_load, None, [status, *ranges, video, status_timer], **page_events)
        generate_api = named_api(h.generate, ("image", "prompt", "max_new_tokens", "sample", "temperature", "top_p",
                                              "min_pixels", "max_pixels"), trailing=("extra_images", "video"),
                                 progress=True, request=True)
        generate_btn.click(h.stop_generation, None, None, queue=False, api_name=False, show_progress="hidden")
        generate_btn.click(generate_api, [image, prompt, max_new, sampling, temperature, top_p, min_px, max_px,
                                        *view_inputs, extra_state, video_state],
                           [run_id, answer, token, chips, *view_outputs, prompt_token, mask_sinks, relative, region,
                            method, *[analysis[name] for name in DERIVED_VIEWS], files],
                           api_name="generate", trigger_mode="always_last", **model_events)
        gr.on([aggregation.input, normalization.input, colormap.input, view.input, grid.input,
               renormalize.input, mask_sinks.input, prompt_token.input, exclude_system.input],
              named_api(h.render, ("run_id",)), [run_id, *view_inputs], view_outputs, api_name="render",
              trigger_mode="always_last",
              **render_events)
        alpha.input(h.render, [run_id, *view_inputs], view_outputs, api_name=False, trigger_mode="always_last",
                    **render_events)
        for shown, lo, hi in ((layer_range, layer_lo, layer_hi), (head_range, head_lo, head_hi)):
            # In the browser: the range's [lo, hi] into the two values, then one redraw (the newest wins).
            shown.change(None, [shown], [lo, hi], js="(range) => [range[0], range[1]]", api_name=False,
                         trigger_mode="always_last", queue=False).then(
                h.refresh, [run_id, *view_inputs], view_outputs, api_name=False, trigger_mode="always_last",
                **render_events)
        prompt_token.input(h.pick_prompt_token, [prompt_token], [chips], api_name=False, queue=False)
        chips.input(h.pick_chip, [chips], [token, prompt_token], api_name=False, queue=False).then(
            h.render, [run_id, *view_inputs], view_outputs, api_name=False, **render_events)
        token.input(h.pick_chip, [token], [chips, prompt_token], api_name=False, queue=False).then(
            h.render, [run_id, *view_inputs], view_outputs, api_name=False, **render_events)
        relative.input(h.relative_toggle, [run_id, *view_inputs], view_outputs, api_name=False, **model_events)
        method.input(named_api(h.method_select, ("run_id",), progress=True), [run_id, *view_inputs], view_outputs,
                     api_name="method", **model_events)
        analysis_inputs = [run_id, analysis["metric"], *view_inputs]
        analysis_outputs = [analysis["matrix"], analysis["text"], analysis["gallery"], analysis["note"]]
        gr.on([analysis["show"].click, analysis["metric"].input], named_api(h.analysis, ("run_id", "metric")),
              analysis_inputs, analysis_outputs, api_name="analysis", **render_events)
        analysis["matrix"].change(h.matrix_pick, [analysis["matrix"]], ranges, api_name=False, queue=False)
        picture.select(named_api(h.box_click, ("run_id", "box_mode", "corner"), select=True),
                       [run_id, box_mode, corner, *view_inputs], [corner, target_box, *view_outputs],
                       api_name=False, **render_events)
        gr.on([target_box.submit, target_box.blur], h.render, [run_id, *view_inputs], view_outputs,
              api_name=False, **render_events)
        picture.select(h.region_click, [run_id, region, view, box_mode], [region, analysis["region_plot"],
                                                                          analysis["region_note"]],
                       api_name=False, **render_events).then(
            h.render_region, [run_id, region, box_mode, *view_inputs], [picture], api_name=False, **render_events)
        analysis["region_clear"].click(h.region_clear, None, [region, analysis["region_plot"],
                                                            analysis["region_note"]], api_name=False).then(
            h.render, [run_id, *view_inputs], view_outputs, api_name=False, **render_events)
        analysis["lens_btn"].click(named_api(h.lens, ("run_id",), view=False, progress=True), [run_id],
                                   [analysis["lens_view"], analysis["lens_file"]], api_name="logit_lens",
                                   **model_events)
        analysis["verify_btn"].click(named_api(h.verify, ("run_id",), progress=True), [run_id, *view_inputs],
                                     [analysis["verify_plot"], analysis["verify_insertion"], analysis["verify_note"]],
                                     api_name="verify",
                                     **model_events)
        analysis["zip"].click(named_api(h.gallery_download, ("run_id",)), [run_id, *view_inputs], [files],
                              api_name="gallery_zip", **render_events)
        png_btn.click(named_api(h.download_png, ("run_id",)), [run_id, *view_inputs], [files], api_name="download_png",
                      **render_events)
        gif_btn.click(named_api(h.download_animation, ("run_id",)), [run_id, *view_inputs], [files],
                      api_name="download_animation", **render_events)
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
    parser.add_argument("--allow-model-loading", action=argparse.BooleanOptionalAction, default=None,
                        help="let users load other models from the page (default: on when serving only on "
                             "127.0.0.1 without --share, off otherwise)")
    parser.add_argument("--max-pixels-cap", type=int, default=AppConfig.max_pixels_cap,
                        help="largest image-token budget (max pixels) a request may ask for")
    parser.add_argument("--ranges", help="a ranges.json from a study (batch.py --manifest ... --val-fraction): "
                        "its model starts with those layer and head ranges")
    args = parser.parse_args(argv)
    if args.session_cache_mb <= 0:
        parser.error("--session-cache-mb must be a positive number of megabytes, e.g. 2048")
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
    return AppConfig(model=args.model, host=args.host, port=args.port, share=args.share, auth=auth,
                     device=args.device, dtype=args.dtype, session_cache_mb=args.session_cache_mb,
                     trust_remote_code=args.trust_remote_code, allow_model_loading=allow_loading,
                     max_pixels_cap=args.max_pixels_cap, ranges=ranges)


def start_loading(cfg: AppConfig, slot: ModelSlot) -> None:
    """Load the start-up model in the background so the page is served at once."""
    model_id = default_model(cfg)
    if not model_id:
        return
    slot.ready.clear()

    def load():
        try:
            slot.load(model_id, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.max_pixels_cap)
        except Exception as err:                                        # the page says why, and what to do
            logger.error("could not load %s: %s", model_id, err)
            slot.startup_failure = f"{model_id}: {err}"
        finally:
            slot.ready.set()
    threading.Thread(target=load, daemon=True).start()


def launch_options(cfg: AppConfig) -> dict:
    """How the server is exposed: only the app's own output folder is served, uploads are capped."""
    return dict(server_name=cfg.host, server_port=cfg.port, share=cfg.share,
                auth=LoginGuard(*cfg.auth) if cfg.auth else None,
                allowed_paths=[str(cfg.outputs_dir)], max_file_size=cfg.max_upload, ssr_mode=False, css=CSS,
                theme=gr.themes.Soft())


def exposure_warnings(cfg: AppConfig) -> list[str]:
    """What the operator should hear about who can reach this server."""
    warnings = []
    if cfg.share and cfg.auth is None:
        warnings.append("--share without --auth: anyone holding the public link can use this machine and its GPU. "
                        "Add --auth user:password to protect it.")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.auth is None:
        warnings.append(f"--host {cfg.host} without --auth: anyone who can reach this machine on port {cfg.port} "
                        "can use it. Add --auth user:password to protect it.")
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
        raise SystemExit(f"Port {cfg.port} on {cfg.host} is already in use (another copy of the app?). Stop that "
                         f"program, or start this one on another port: python app.py --port {cfg.port + 1}")
    for warning in exposure_warnings(cfg):
        logger.warning(warning)
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
