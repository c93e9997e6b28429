"""The Gradio adapters of the analysis tabs: the layer × head matrix, text attention and gallery, the
image → text region, verify and the logit lens. `handlers.Handlers` inherits them; they use its
settings, store and model slot.
"""

from __future__ import annotations

import html
import math
from dataclasses import replace

import gradio as gr
import numpy as np
import pandas as pd

from analysis import cell_at, head_matrix, region_to_text, system_positions, text_attention
from exports import save_gallery_zip, save_page
from pictures.gallery import head_gallery
from pictures.stored_run import StoredRun
from pictures.view_parts import mark_corner, outline_cells
from pictures.views import (
    analysis_note,
    as_text,
    matrix_view,
    on_screen,
    region_note,
    render,
    screen_zoom,
    step_labels,
    token_label,
    verify_note,
)
from pipeline import lens_page, verify_map
from ui.components import parse_box, session_of, user_errors
from ui.controls import ANALYSIS_OUTPUTS, BOX_OUTPUTS, REGION_OUTPUTS, pack
from visualization import SIDE_BY_SIDE_GAP

# The map's order in a strong colour, the random order in grey, in both verify plots.
VERIFY_COLORS = ("#d62728", "#7f7f7f")


class AnalysisHandlers:
    """Handlers of the analysis tabs (a mixin of `handlers.Handlers`)."""

    # -- analysis ---------------------------------------------------------------------------------
    def _single(self, run_id) -> StoredRun:
        stored = self.store.get(run_id)
        if not stored.is_single_image:
            raise gr.Error(
                "This view works on a single image. Generate with one image (no extra images or video) "
                "to use it; the main picture and its caption cover several images and videos."
            )
        return stored

    @user_errors
    def analysis(self, run_id, metric, *view_values):
        """Layer × head matrix picture, text attention and the per-head gallery for the selected token."""
        stored, s = self._single(run_id), self._settings(*view_values)
        every = ((0, stored.run.layer_indices[-1]), (0, stored.run.num_heads - 1))  # the matrix's own ranges
        matrix = head_matrix(stored.run, s.step_idx, *every)
        pieces = text_attention(
            stored.run,
            s.step_idx,
            s.layers,
            s.heads,
            exclude_positions=system_positions(stored.run) if s.exclude_system else (),
        )
        fits = s.num_maps <= self.cfg.max_gallery_maps
        tiles = head_gallery(stored.run, stored.image, s.step_idx, s.layers, s.heads, s.colormap) if fits else []
        top = max((p.weight for p in pieces if p.kind != "excluded"), default=1.0) or 1.0
        highlighted = [(p.text, round(p.weight / top, 3) if p.kind != "excluded" else None) for p in pieces]
        token = as_text(token_label(s.step_idx, stored.run.generated_tokens[s.step_idx]))
        shown = (
            f"**Token {token}** · the matrix: every layer × head · the text and the gallery: layers "
            f"{s.layers[0]}–{s.layers[1]}, heads {s.heads[0]}–{s.heads[1]} · {as_text(stored.run.model_id)}. "
        )  # which result, token and ranges these views show
        note = analysis_note(
            stored.sinks(s.layers, s.heads), None if fits else (s.num_maps, self.cfg.max_gallery_maps), shown
        )
        captions = [
            f"layer {layer} · head {head}"
            for layer in stored.run.layers_in(s.layers)
            for head in range(s.heads[0], s.heads[1] + 1)
        ]  # 0-based, as on the page
        return (
            matrix_view(matrix[metric], stored.run.layers_in(every[0]), every[1], metric),
            highlighted,
            [(tile, caption) for (_, tile), caption in zip(tiles, captions, strict=False)],
            note,
        )

    def analysis_follow(self, run_id, metric, matrix, *view_values):
        """The analysis views again after the token or the ranges changed, once they have been shown for
        this result (`matrix` drawn); nothing before that, so a new result stays empty until asked."""
        if not matrix or run_id is None:
            return pack(ANALYSIS_OUTPUTS)
        return self.analysis(run_id, metric, *view_values)

    def matrix_pick(self, matrix: dict | None):
        """A click on a matrix cell: (layer range, head range) of that one layer and head; the ranges'
        change redraws the map. A matrix drawn anew (nothing picked yet) changes nothing."""
        picked = (matrix or {}).get("picked")
        if not picked:
            return gr.skip(), gr.skip()
        layer, head = int(picked[0]), int(picked[1])
        return [layer, layer], [head, head]

    def _clicked_pixel(self, stored: StoredRun, view: str, evt: gr.SelectData) -> tuple[float, float]:
        """Where a click on the picture landed, in the original image's pixels."""
        index = getattr(evt, "index", None)
        if not (
            isinstance(index, (list, tuple))
            and len(index) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in index)
        ):
            raise gr.Error("The click carried no position on the picture; click on the picture itself.")
        zoom = screen_zoom(stored)
        x, y = index[0] / zoom, index[1] / zoom  # in the drawn picture's pixels
        shown, (sx, sy) = stored.display(0)
        if view == "side_by_side" and x >= shown.size[0]:
            x -= shown.size[0] + SIDE_BY_SIDE_GAP  # the overlay is the right half
        return x / sx, y / sy

    @user_errors
    def box_click(self, run_id, box_mode, corner, *view_values, evt: gr.SelectData = None):
        """With 'Clicks draw the target box' on, the first click on the picture sets one corner of the box
        (marked with a cross) and the second the opposite one, which redraws the map with the box and its
        scores. BOX_OUTPUTS: the pending corner, the box text, and the picture, caption and share table."""
        if not box_mode:
            return pack(BOX_OUTPUTS)
        stored, settings = self._single(run_id), self._settings(*view_values)
        width, height = stored.run.vision.image_size
        x, y = self._clicked_pixel(stored, settings.view, evt)
        x, y = min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))
        if not corner:
            picture, _ = render(stored, settings)
            return pack(
                BOX_OUTPUTS,
                corner=[x, y],
                picture=on_screen(stored, mark_corner(stored, picture, (x, y), settings.view)),
            )
        text = ", ".join(
            str(round(v)) for v in (min(corner[0], x), min(corner[1], y), max(corner[0], x), max(corner[1], y))
        )
        box = parse_box(text)  # refuses two clicks on one spot
        picture, caption, plot = self._render_with(stored, replace(settings, target_box=box))
        return pack(BOX_OUTPUTS, corner=None, target_box=text, picture=picture, caption=caption, plot=plot)

    @user_errors
    def region_click(self, run_id, region, view, evt: gr.SelectData, region_mode=True):
        """With 'Clicks pick region cells' on, a click on the picture adds or removes that token cell and
        shows who attends to the region; otherwise the click leaves the region alone."""
        if not region_mode:
            return pack(REGION_OUTPUTS)
        stored = self._single(run_id)
        cell = cell_at(stored.run, *self._clicked_pixel(stored, view, evt))  # in the original image's pixels
        cells = {tuple(c) for c in region or []}
        if cell is not None:
            cells ^= {cell}
        return [list(c) for c in sorted(cells)], *self._region_views(stored, cells)

    @user_errors
    def render_region(self, run_id, region, region_mode, *view_values):
        """The picture with the picked region's cells outlined (after a click on it); nothing unless
        clicks pick region cells (a click that draws the box redraws the picture itself)."""
        if not region_mode:
            return gr.skip()
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
        table = pd.DataFrame(
            {
                "step": step_labels(stored.run.num_steps),
                "share": summary["per_step"],
                "token": [token_label(t, tok) for t, tok in enumerate(stored.run.generated_tokens)],
            }
        )
        return table, region_note(stored.run, cells, summary["per_head"])

    @user_errors
    def lens(self, run_id, progress=gr.Progress()) -> tuple[str, str]:
        """Logit lens over the image's patches (a model pass), shown in a sandboxed frame and saved as HTML."""
        stored = self._single(run_id)
        progress(0, desc="Decoding every layer at every image patch")
        page = lens_page(self.slot, stored)
        path = self._kept(save_page(page, self.cfg.outputs_dir, "logit-lens"))
        frame = (
            f'<iframe title="Logit lens" sandbox="allow-scripts" style="width:100%;height:820px;border:0" '
            f'srcdoc="{html.escape(page, quote=True)}"></iframe>'
        )
        return frame, str(path)

    @user_errors
    def verify(self, run_id, *view_values, progress=gr.Progress()):
        """Deletion and insertion curves of the current map against a random order (model passes)."""
        stored, s = self._single(run_id), self._settings(*view_values)
        progress(0, desc="Blurring cells in map order and in a random order")
        result = verify_map(self.slot, stored, s)
        auc = result.summary()

        def plot(kind: str) -> gr.LinePlot:  # map vs random order, AUCs in the legend
            names = {
                kind: f"map order (AUC {auc[kind]:.3f})",
                f"random_{kind}": f"random order (AUC {auc[f'random_{kind}']:.3f})",
            }
            table = pd.DataFrame(
                [
                    {"fraction": float(f), "probability": float(p), "curve": name}
                    for key, name in names.items()
                    for f, p in zip(result.fractions, getattr(result, key), strict=True)
                ]
            )
            return gr.LinePlot(value=table, color_map=dict(zip(names.values(), VERIFY_COLORS, strict=True)))

        token = as_text(token_label(s.step_idx, stored.run.generated_tokens[s.step_idx]))
        return plot("deletion"), plot("insertion"), f"Token {token}: " + verify_note(auc)

    @user_errors
    def gallery_download(self, run_id, *view_values, request: gr.Request | None = None) -> str:
        stored, s = self._single(run_id), self._settings(*view_values)
        if s.num_maps > self.cfg.max_gallery_maps:
            raise gr.Error(
                f"The gallery holds at most {self.cfg.max_gallery_maps} layer × head maps "
                f"(now {s.num_maps}); narrow the layer or head range."
            )
        with self.exports.export(session_of(request)) as lane:
            tiles = head_gallery(stored.run, stored.image, s.step_idx, s.layers, s.heads, s.colormap)
            return str(self._kept(save_gallery_zip(lane.paced(tiles), self.cfg.outputs_dir, s.step_idx)))
