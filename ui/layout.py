"""The page's layout: small builders, each placing one part of the page and returning its components by
name. `app.build_ui` puts them together into the records of `ui.controls` and wires them by name.

The names are the ones the handlers use (`ui.controls.pack`) and the API's parameters; the view
controls' names are the fields of `ViewControls`.
"""

from __future__ import annotations

import json
from dataclasses import fields

import gradio as gr
import torch

from attention_processor import COMBINES, RAW_ATTENTION, REDUCTIONS
from config import DEMO_MODEL_DIR, EXAMPLES_DIR, GPU_DEFAULT_MODEL, AppConfig
from demo.data import guide as demo_guide
from families import video_families
from methods import METHODS
from pictures.stored_run import DISPLAY_NORMALIZATIONS
from pictures.views import VIEWS
from ui.components import image_upload, matrix_heatmap, range_slider, upload_bytes
from ui.controls import KNOCKOUT_HINT, NO_REGION, ViewControls
from ui.picture_output import picture_output
from visualization import COLORMAPS

CSS = """
#token-chips .wrap { gap: 4px !important; max-height: 5.4em; overflow-y: auto; }
#title p { margin: 0 !important; }
#token-chips label { padding: 2px 8px !important; min-width: 0 !important; font-family: monospace; }
.range-row { gap: 6px !important; }
#head-gallery .caption-label { white-space: normal !important; max-width: 100% !important; }
#head-gallery .caption-label { overflow: visible !important; }
#token-chips label.combined { outline: 2px solid #d62728; outline-offset: -2px; }
"""

# Shift-click on a token chip adds it to 'Combine tokens' (or takes it out) instead of selecting it alone;
# the combined chips are outlined. A plain click selects one token, as before, and clears the outlines.
CHIPS_JS = """
() => {
  const chips = () => [...document.querySelectorAll('#token-chips label')];
  const stepOf = (label) => parseInt(label.textContent.trim(), 10);
  const parse = (text) => {
    const steps = new Set();
    for (const piece of text.replace(/\u2013/g, '-').split(',')) {
      const [lo, hi] = piece.split('-').map((v) => v.trim());
      if (lo === '' || lo === undefined) continue;
      const first = parseInt(lo, 10), last = hi === undefined ? first : parseInt(hi, 10);
      for (let t = first; t <= last && t - first < 64; t++) if (!Number.isNaN(t)) steps.add(t);
    }
    return steps;
  };
  document.addEventListener('click', (event) => {
    const label = event.target.closest('#token-chips label');
    if (!label) return;
    if (!event.shiftKey) { chips().forEach((chip) => chip.classList.remove('combined')); return; }
    event.preventDefault();
    event.stopPropagation();
    const box = document.querySelector('#token-steps textarea, #token-steps input');
    if (!box) return;
    const picked = parse(box.value);
    if (picked.size === 0) {
      const current = chips().find((chip) => chip.querySelector('input:checked'));
      if (current) picked.add(stepOf(current));
    }
    const step = stepOf(label);
    if (picked.has(step)) picked.delete(step); else picked.add(step);
    box.value = [...picked].sort((a, b) => a - b).join(', ');
    chips().forEach((chip) => chip.classList.toggle('combined', picked.has(stepOf(chip))));
    box.dispatchEvent(new Event('input', { bubbles: true }));
    setTimeout(() => box.dispatchEvent(new Event('blur')), 60);
  }, true);
}
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


def model_row(cfg: AppConfig) -> dict:
    """The model picker, its Load button, the status line and the load's hidden answer."""
    with gr.Row(equal_height=False, elem_id="model-row"):
        model_box = gr.Dropdown(
            model_choices(cfg),
            value=default_model(cfg),
            allow_custom_value=True,
            label="Model (preset, hub id or local folder)"
            if cfg.allow_model_loading
            else "Model (this server's operator turned loading other models off)",
            interactive=cfg.allow_model_loading,
            elem_id="model-id",
            scale=4,
            show_label=not cfg.allow_model_loading,
            container=not cfg.allow_model_loading,
        )
        load_btn = gr.Button("Load", elem_id="load-btn", scale=1, interactive=cfg.allow_model_loading, size="md")
    status = gr.Markdown("Starting…", elem_id="model-status")
    load_result = gr.Textbox(visible="hidden", elem_id="load-result")  # the API's answer
    return {
        "model_box": model_box,
        "load_btn": load_btn,
        "status": status,
        "load_result": load_result,
        "status_timer": gr.Timer(2.0, active=False),
    }


def inputs_column(cfg: AppConfig) -> dict:
    """The image, prompt, Generate, the answer, generation settings, extra images or a video, examples."""
    image = image_upload(
        upload_bytes(cfg.max_upload), image_mode=None, label="Image", elem_id="image-input", height=240
    )
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="e.g. What color is the circle?")
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
    with gr.Accordion(f"More images, or a video (video: {', '.join(video_families())})", open=False):
        extra_images = gr.File(
            file_count="multiple",
            file_types=["image"],
            elem_id="extra-images",
            label="More images, after the first one, in this order",
        )
        video = gr.Video(label="A video instead of images", elem_id="video-input", height=200)
    examples = example_rows()
    if examples:
        gr.Examples(examples, [image, prompt], label="Examples for the demo model", examples_per_page=6)
        gr.Markdown(demo_guide(), elem_id="demo-guide")
    return {
        "image": image,
        "prompt": prompt,
        "generate_btn": generate_btn,
        "answer": answer,
        "max_new": max_new,
        "sampling": sampling,
        "temperature": temperature,
        "top_p": top_p,
        "min_px": min_px,
        "max_px": max_px,
        "extra_images": extra_images,
        "video": video,
    }


def map_column() -> dict:
    """The token chips, the picture and its caption, the token pickers and the share plot."""
    chips = gr.Radio([], label="Tokens", elem_id="token-chips", show_label=False)
    picture = picture_output(format="jpeg", label="Attention", elem_id="overlay", height=400)
    with gr.Row(elem_id="click-tools"):  # beside the picture, so ticking one never scrolls the map away
        box_mode = gr.Checkbox(False, label="Clicks draw the target box", elem_id="box-mode", min_width=120)
        region_mode = gr.Checkbox(False, label="Clicks pick region cells", elem_id="region-mode", min_width=120)
    caption = gr.Markdown("", elem_id="caption")
    with gr.Row():
        # Valued 0 from the start, so API clients may leave `token` out (Gradio reads defaults from components).
        token = gr.Dropdown(
            [], value=0, label="Generated token (index: token)", elem_id="token-dropdown", allow_custom_value=True
        )
        prompt_token = gr.Dropdown(
            [],
            value="",
            label="…or a prompt token (what that word looks at)",
            elem_id="prompt-token-dropdown",
            allow_custom_value=True,
        )
    with gr.Row(elem_id="combine-row"):
        tokens = gr.Textbox(
            "",
            label="Combine tokens (shift-click chips, or type 3, 4 or 3-5; Enter)",
            placeholder="one token: leave empty",
            elem_id="token-steps",
            scale=3,
            min_width=160,
        )
        word = gr.Dropdown([], value=None, label="…or a word of the answer", elem_id="word-pick", scale=2)
        combine = gr.Radio(list(COMBINES), value="sum", label="Combined by", elem_id="combine", scale=2)
    plot = gr.BarPlot(
        x="step",
        y="share",
        color="selected",
        tooltip=["token", "share"],
        sort="x",
        title="Attention share on the image per generated token",
        y_lim=[0, 1],
        x_label_angle=-45,  # a long answer's token labels slant instead of overlapping
        elem_id="share-plot",
        height=220,
        color_map={"selected": "#d62728", "other": "#b8c4d6"},
    )
    return {
        "chips": chips,
        "picture": picture,
        "caption": caption,
        "box_mode": box_mode,
        "region_mode": region_mode,
        "token": token,
        "prompt_token": prompt_token,
        "tokens": tokens,
        "word": word,
        "combine": combine,
        "plot": plot,
    }


def knockout_panel() -> dict:
    """ "Does it matter?": what to block, a knockout against random controls, and the layer sweep."""
    with gr.Accordion("Does it matter? Knock out what the map points at", open=True, elem_id="knockout"):
        with gr.Row():
            target = gr.Radio(
                [("the target box or region", "box"), ("the map's top k cells", "topk"), ("the whole image", "image")],
                value="box",
                label="Block from the token",
                elem_id="ko-target",
                scale=3,
            )
            top_k = gr.Number(8, precision=0, minimum=1, label="k", elem_id="ko-k", min_width=60, scale=1)
        with gr.Row():
            in_ranges = gr.Checkbox(False, label="Only in the selected layers and heads", elem_id="ko-ranges")
            window = gr.Number(9, precision=0, minimum=1, label="Sweep window (layers)", elem_id="ko-window")
        with gr.Row():
            ko_btn = gr.Button("Knock out", variant="secondary", elem_id="ko-btn")
            sweep_btn = gr.Button("Sweep the layers (box)", elem_id="ko-sweep-btn")
        note = gr.Markdown(KNOCKOUT_HINT, elem_id="ko-note")
        plot = gr.Plot(label="Layer sweep", elem_id="ko-plot")
    return {
        "ko_target": target,
        "ko_k": top_k,
        "ko_ranges": in_ranges,
        "ko_window": window,
        "ko_btn": ko_btn,
        "ko_sweep_btn": sweep_btn,
        "ko_note": note,
        "ko_plot": plot,
    }


def _range(label: str, elem_id: str) -> tuple[gr.HTML, gr.Number, gr.Number]:
    """A two-handle range (what the user moves) and the two plain values it keeps in step, hidden: the
    API's `{layers,heads}_{lo,hi}` parameters and every handler read those."""
    shown = range_slider(label, elem_id, maximum=0)
    # Empty until the range sets them, so an API call that leaves them out gets the page's own ranges.
    lo = gr.Number(None, precision=0, label=f"{label} from", elem_id=f"{elem_id}-lo", visible="hidden")
    hi = gr.Number(None, precision=0, label=f"{label} to", elem_id=f"{elem_id}-hi", visible="hidden")
    return shown, lo, hi


def settings_column(cfg: AppConfig, record: type = ViewControls) -> dict:
    """The ranges, the method and the display settings, the target box, and the download buttons. A view
    control of `record` that this column does not place itself is made by its `make` and put under
    "More display options"."""
    built: dict = {}
    built["layer_range"], built["layer_lo"], built["layer_hi"] = _range("Layers", "layer-range")
    built["head_range"], built["head_lo"], built["head_hi"] = _range("Heads", "head-range")
    built["method"] = gr.Radio(
        list(METHODS),
        value=RAW_ATTENTION,
        elem_id="method",
        label="Map (all but the first are computed on demand): "
        + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()),
    )
    built["parts"] = gr.Checkbox(
        False, label="Show what the map is built from beside it (TAM: raw logit map, interference)", elem_id="parts"
    )
    with gr.Row():
        built["contrast_token"] = gr.Dropdown(
            [],
            value=None,
            label="Contrast: minus another token's map",
            elem_id="contrast-token",
            allow_custom_value=True,
            min_width=120,
        )
        built["contrast_prompt"] = gr.Textbox(
            "",
            label="…or another prompt's (Enter)",
            placeholder="e.g. Where is the square?",
            elem_id="contrast-prompt",
            min_width=120,
        )
    with gr.Row():
        built["aggregation"] = gr.Dropdown(
            list(REDUCTIONS), value=cfg.aggregation, label="Aggregation", elem_id="aggregation", min_width=100
        )
        built["normalization"] = gr.Dropdown(
            list(DISPLAY_NORMALIZATIONS),
            value=cfg.normalization,
            label="Normalisation",
            elem_id="normalization",
            min_width=100,
        )
    with gr.Row():
        built["colormap"] = gr.Dropdown(
            list(COLORMAPS), value=cfg.colormap, label="Colormap", elem_id="colormap", min_width=100
        )
        built["alpha"] = gr.Slider(0, 1, value=cfg.alpha, step=0.05, label="Alpha", elem_id="alpha", min_width=100)
    built["view"] = gr.Radio(list(VIEWS), value=cfg.view, label="View", elem_id="view")
    built["target_box"] = gr.Textbox(
        "",
        label="Target box: x0, y0, x1, y1 in image pixels",
        placeholder="type it, or tick 'Clicks draw the target box' under the map and click two corners",
        elem_id="target-box",
        min_width=160,
    )
    with gr.Accordion("More display options", open=False):
        built["grid"] = gr.Checkbox(False, label="Show token grid", elem_id="grid")
        built["renormalize"] = gr.Checkbox(False, label="Renormalise within the image", elem_id="renormalize")
        built["mask_sinks"] = gr.Checkbox(False, label="Mask sink cells", elem_id="mask-sinks")
        built["relative"] = gr.Checkbox(False, label="Relative to a generic prompt", elem_id="relative")
        built["exclude_system"] = gr.Checkbox(False, label="Exclude BOS and system prompt", elem_id="exclude-system")
        for f in fields(record):
            if f.name not in built and f.name not in ("token", "prompt_token", "tokens", "combine"):
                if f.metadata.get("make") is None:
                    raise TypeError(f"The view control {f.name!r} has no place on the page: give it a `make`.")
                built[f.name] = f.metadata["make"]()
    with gr.Row():  # two rows, so no label is cut off in a narrow column
        built["png_btn"] = gr.Button("Picture (PNG)", elem_id="png-btn", min_width=80)
        built["gif_btn"] = gr.Button("Animation (GIF)", elem_id="gif-btn", min_width=80)
    built["export_btn"] = gr.Button("Attention (safetensors)", elem_id="export-btn")
    built["files"] = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
    return built


def analysis_tabs() -> dict:
    """The analysis views for the selected token and ranges, refreshed on demand."""
    with gr.Tabs(elem_id="analysis"):
        with gr.Tab("Layers × heads", elem_id="tab-matrix"):
            with gr.Row():
                metric = gr.Radio(
                    ["share", "entropy"],
                    value="share",
                    elem_id="matrix-metric",
                    label="Matrix: attention share on the image, or spatial entropy of each head's map",
                )
                show = gr.Button("Show analysis for the selected token", elem_id="analysis-btn")
            with gr.Row():
                matrix = matrix_heatmap("Layer × head, 0-based (click a cell to show that head's map)", "head-matrix")
                text = gr.HighlightedText(
                    label="What the token attends to in the text (with 'Exclude BOS and "
                    "system prompt', those are shown unhighlighted)",
                    elem_id="text-attention",
                )
            note = gr.Markdown("", elem_id="analysis-note")
        with gr.Tab("Per-head gallery", elem_id="tab-gallery"):
            gallery = gr.Gallery(
                label="Per-head maps (layer and head 0-based)", columns=8, height=420, elem_id="head-gallery"
            )
            zip_btn = gr.Button(
                "Download the gallery (ZIP; files named S{step}_L{layer}_H{head}, 1-based)", elem_id="gallery-zip"
            )
        with gr.Tab("Region → text", elem_id="tab-region"):
            gr.Markdown(
                "Tick 'Clicks pick region cells' under the map, then click token cells on the picture "
                "to build a region (click again to remove a cell); the picked cells are outlined."
            )
            with gr.Row():
                region_plot = gr.BarPlot(
                    x="step",
                    y="share",
                    tooltip=["token", "share"],
                    height=220,
                    sort="x",
                    title="Attention share on the region per generated token",
                    y_lim=[0, 1],
                    elem_id="region-plot",
                )
                with gr.Column():
                    region_note = gr.Markdown(NO_REGION, elem_id="region-note")
                    region_clear = gr.Button("Clear region", elem_id="region-clear")
        with gr.Tab("Verify", elem_id="tab-verify"):
            with gr.Row():
                verify_btn = gr.Button(
                    "Verify this map: delete / insert cells in map order vs a random order", elem_id="verify-btn"
                )
                verify_note = gr.Markdown("", elem_id="verify-note")
            with gr.Row():
                verify_plot = gr.LinePlot(
                    x="fraction",
                    y="probability",
                    color="curve",
                    height=260,
                    elem_id="verify-plot",
                    y_lim=[0, 1],
                    title="Deleting cells: the token's probability (lower AUC = better map)",
                )
                verify_insertion = gr.LinePlot(
                    x="fraction",
                    y="probability",
                    color="curve",
                    height=260,
                    elem_id="verify-plot-insertion",
                    y_lim=[0, 1],
                    title="Inserting cells: the token's probability (higher AUC = better)",
                )
        with gr.Tab("Compare two runs", elem_id="tab-compare"):
            gr.Markdown(
                "Keep a result as A, then generate B: another model (a base and its fine-tune, or any two loaded "
                "one after the other), another prompt, or another image of the same size. Both maps at the "
                "selected token of B (A's token matched by position or by text), their difference, and each "
                "run's share of attention on the image per layer. Both results count in the session store."
            )
            with gr.Row():
                compare_keep = gr.Button("Keep this result as A", elem_id="compare-keep")
                compare_match = gr.Radio(
                    ["position", "text"], value="position", label="Match A's token by", elem_id="compare-match"
                )
                compare_btn = gr.Button("Compare with A", elem_id="compare-btn", variant="primary")
            compare_note = gr.Markdown("", elem_id="compare-note")
            with gr.Row():
                compare_picture = picture_output(label="A, B and A - B", elem_id="compare-picture", format="png")
                compare_plot = gr.LinePlot(
                    x="layer",
                    y="share",
                    color="run",
                    height=260,
                    y_lim=[0, 1],
                    title="Share of the token's attention on the image, per layer (heads averaged)",
                    elem_id="compare-plot",
                )
        with gr.Tab("Logit lens", elem_id="tab-lens"):
            with gr.Row():
                lens_btn = gr.Button("Logit lens: decode every layer at every image patch", elem_id="lens-btn")
                lens_file = gr.File(label="Logit lens page (HTML, works offline)", interactive=False, height=80)
            lens_view = gr.HTML("", elem_id="logit-lens")
    return {
        "metric": metric,
        "show": show,
        "matrix": matrix,
        "text": text,
        "gallery": gallery,
        "note": note,
        "zip": zip_btn,
        "region_plot": region_plot,
        "region_note": region_note,
        "region_clear": region_clear,
        "lens_btn": lens_btn,
        "lens_view": lens_view,
        "lens_file": lens_file,
        "verify_btn": verify_btn,
        "verify_plot": verify_plot,
        "verify_insertion": verify_insertion,
        "verify_note": verify_note,
        "compare_keep": compare_keep,
        "compare_match": compare_match,
        "compare_btn": compare_btn,
        "compare_note": compare_note,
        "compare_picture": compare_picture,
        "compare_plot": compare_plot,
    }
