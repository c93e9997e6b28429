"""The events of the page's secondary parts (the region and box clicks, the analysis tabs, the downloads),
wired by component name; `app.wire` wires the main flow and calls these."""

from __future__ import annotations

import functools

import gradio as gr

from ui.compare_handlers import COMPARE_OUTPUTS
from ui.controls import ANALYSIS_OUTPUTS, BOX_OUTPUTS, REGION_OUTPUTS, Page
from ui.handlers import Handlers
from ui.handlers import named_api as named_view_api


def export_events(h: Handlers) -> dict:
    """Exports have workers of their own, as many as the handlers' export lane writes at once."""
    return dict(concurrency_id="export", concurrency_limit=h.cfg.export_workers, show_progress="minimal")


def named_api_for(page: Page):
    """`ui.handlers.named_api` for this page: the API names every view control of the page's record."""
    return functools.partial(named_view_api, record=type(page.view))


def _one_tool(on: bool):
    """Ticking one click tool unticks the other (and forgets a half-drawn box)."""
    return (False, None) if on else (gr.skip(), gr.skip())


def wire_region_and_box(page: Page, h: Handlers, with_run: list, view_outputs: list, render_events: dict) -> None:
    named_api = named_api_for(page)
    for tool, other in (("box_mode", "region_mode"), ("region_mode", "box_mode")):
        page[tool].input(
            _one_tool, [page[tool]], [page[other], page["corner"]], api_name=False, queue=False, show_progress="hidden"
        )
    page["picture"].select(
        named_api(h.box_click, ("run_id", "box_mode", "corner"), select=True),
        [page["run_id"], page["box_mode"], page["corner"], *page.view_inputs],
        page.pick(BOX_OUTPUTS),
        api_name=False,
        **render_events,
    )
    gr.on(
        [page["target_box"].submit, page["target_box"].blur],
        h.render,
        with_run,
        view_outputs,
        api_name=False,
        **render_events,
    )
    page["picture"].select(
        h.region_click,
        page.pick(("run_id", "region", "view", "region_mode")),
        page.pick(REGION_OUTPUTS),
        api_name=False,
        **render_events,
    ).then(
        h.render_region,
        [page["run_id"], page["region"], page["region_mode"], *page.view_inputs],
        [page["picture"]],
        api_name=False,
        **render_events,
    )
    page["region_clear"].click(h.region_clear, None, page.pick(REGION_OUTPUTS), api_name=False).then(
        h.render, with_run, view_outputs, api_name=False, **render_events
    )


def wire_analysis(
    page: Page, h: Handlers, with_run: list, ranges: list, model_events: dict, render_events: dict
) -> None:
    named_api = named_api_for(page)
    analysis_outputs = page.pick(ANALYSIS_OUTPUTS)
    gr.on(
        [page["show"].click, page["metric"].input],
        named_api(h.analysis, ("run_id", "metric")),
        [page["run_id"], page["metric"], *page.view_inputs],
        analysis_outputs,
        api_name="analysis",
        trigger_mode="always_last",
        **render_events,
    )
    page["matrix"].change(h.matrix_pick, [page["matrix"]], ranges, api_name=False, queue=False)
    # Once shown, the analysis follows the token and the ranges, so it never shows an older pick.
    gr.on(
        [page[name].change for name in ("token", "layer_lo", "layer_hi", "head_lo", "head_hi")],
        h.analysis_follow,
        [page["run_id"], page["metric"], page["matrix"], *page.view_inputs],
        analysis_outputs,
        api_name=False,
        trigger_mode="always_last",
        **render_events,
    )
    page["lens_btn"].click(
        named_api(h.lens, ("run_id",), view=False, progress=True),
        [page["run_id"]],
        page.pick(("lens_view", "lens_file")),
        api_name="logit_lens",
        **model_events,
    )
    page["verify_btn"].click(
        named_api(h.verify, ("run_id",), progress=True),
        with_run,
        page.pick(("verify_plot", "verify_insertion", "verify_note")),
        api_name="verify",
        **model_events,
    )
    page["zip"].click(
        named_api(h.gallery_download, ("run_id",), request=True),
        with_run,
        [page["files"]],
        api_name="gallery_zip",
        **export_events(h),
    )


def wire_downloads(page: Page, h: Handlers, with_run: list) -> None:
    """The downloads, in the exports' own workers (`export_events`), so they never hold a render's."""
    named_api = named_api_for(page)
    page["png_btn"].click(
        named_api(h.download_png, ("run_id",), request=True),
        with_run,
        [page["files"]],
        api_name="download_png",
        **export_events(h),
    )
    page["gif_btn"].click(
        named_api(h.download_animation, ("run_id",), request=True),
        with_run,
        [page["files"]],
        api_name="download_animation",
        **export_events(h),
    )
    page["export_btn"].click(
        named_api(h.export_attention, ("run_id",), view=False, request=True),
        [page["run_id"]],
        [page["files"]],
        api_name="export_attention",
        **export_events(h),
    )


def wire_causal(page: Page, h: Handlers, model_events: dict) -> None:
    named_api = named_api_for(page)
    common = [*page.view_inputs, page["region"]]
    page["ko_btn"].click(
        named_api(h.knockout, ("run_id", "target", "top_k", "in_ranges"), trailing=("region",), progress=True),
        [page["run_id"], page["ko_target"], page["ko_k"], page["ko_ranges"], *common],
        [page["ko_note"]],
        api_name="knockout",
        trigger_mode="always_last",
        **model_events,
    )
    page["ko_sweep_btn"].click(
        named_api(h.knockout_sweep, ("run_id", "window", "in_ranges"), trailing=("region",), progress=True),
        [page["run_id"], page["ko_window"], page["ko_ranges"], *common],
        page.pick(("ko_plot", "ko_note")),
        api_name="knockout_sweep",
        trigger_mode="always_last",
        **model_events,
    )


def wire_compare(page: Page, h: Handlers, render_events: dict) -> None:
    """Keep the current result as A; draw A against the current result, and follow the token and ranges."""
    named_api = named_api_for(page)
    page["compare_keep"].click(
        named_api(h.compare_keep, ("run_id",), view=False),
        [page["run_id"]],
        page.pick(("compare_a", "compare_note", "compare_shown")),
        api_name="compare_keep",
        **render_events,
    )
    compare_inputs = [page["run_id"], page["compare_a"], page["compare_match"]]
    gr.on(
        [page["compare_btn"].click, page["compare_match"].input],
        named_api(h.compare, ("run_id", "run_a", "match")),
        [*compare_inputs, *page.view_inputs],
        page.pick(COMPARE_OUTPUTS),
        api_name="compare",
        trigger_mode="always_last",
        **render_events,
    )
    gr.on(  # a new result (B) or another token or range: drawn again once shown, never a stale pair
        [page[name].change for name in ("run_id", "token", "layer_lo", "layer_hi", "head_lo", "head_hi")],
        h.compare_follow,
        [*compare_inputs, page["compare_shown"], *page.view_inputs],
        page.pick(COMPARE_OUTPUTS),
        api_name=False,
        trigger_mode="always_last",
        **render_events,
    )
