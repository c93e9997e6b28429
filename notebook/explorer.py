"""The token strip and the layer and head ranges, live in a notebook: `explore(run)`.

With ipywidgets installed, an `Explorer`: a token picker, two range sliders and a method picker whose
picture is recomputed in the kernel on every change (any map method; those that replay the model need the
holder). Without it, an `ExplorerPage`: a self-contained HTML view (no network, no kernel) that holds every
token's raw attention on the image's cells per captured layer and head, and recomputes the mean over the
chosen ranges in the page, drawing crisp token cells over the image with the part the model never saw
hatched. Its data is bounded (`PAGE_BUDGET` values): past it, the heads are averaged in the page's data,
and past that the view is refused with what to narrow.
"""

from __future__ import annotations

import base64
import html
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attention_processor import RAW_ATTENTION
from errors import InputError
from methods import METHODS
from notebook.inline import picture_of, stored_run, view_settings
from pictures.report import png_bytes, script_json, visible_token
from pictures.views import token_label
from records import AttentionRun
from utils import scale_box
from visualization import colormap_lut, overlay

PAGE_BUDGET = 2_000_000  # float32 values an ExplorerPage embeds at most (8 MB before base64)


def explore(run: AttentionRun, holder=None, widgets: bool | None = None, max_side: int = 640):
    """The run's maps with the token strip and both ranges live: an ipywidgets `Explorer` (when ipywidgets is
    installed and `widgets` is not False), else a self-contained `ExplorerPage`."""
    if widgets is None:
        widgets = importlib.util.find_spec("ipywidgets") is not None
    if widgets:
        return Explorer(run, holder=holder, max_side=max_side)
    return ExplorerPage(run, max_side=max_side)


class Explorer:
    """An ipywidgets panel over one run: `token`, `layers`, `heads` and `method` are its controls, `image` and
    `caption` what they show; every change redraws in the kernel. Jupyter displays it as the panel."""

    def __init__(self, run: AttentionRun, holder=None, max_side: int = 640):
        import ipywidgets as w

        if run.num_steps == 0:
            raise InputError("This run generated no tokens, so there is no map to explore. Generate again.")
        self.run, self.holder, self.max_side = run, holder, max_side
        stored_run(run)  # its pictures and caches, made once
        lo, hi = run.layer_indices[0], run.layer_indices[-1]
        names = [name for name, entry in METHODS.items() if holder is not None or not entry.needs_model]
        self.token = w.Dropdown(
            options=[(token_label(t, piece), t) for t, piece in enumerate(run.generated_tokens)],
            value=0,
            description="Token",
        )
        self.layers = w.IntRangeSlider(value=(lo, hi), min=lo, max=hi, description="Layers", continuous_update=False)
        self.heads = w.IntRangeSlider(
            value=(0, run.num_heads - 1), min=0, max=run.num_heads - 1, description="Heads", continuous_update=False
        )
        self.method = w.Dropdown(options=names, value=RAW_ATTENTION, description="Method")
        self.image = w.Image(format="png")
        self.caption = w.HTML()
        for control in (self.token, self.layers, self.heads, self.method):
            control.observe(lambda _change: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.token, self.method]), self.layers, self.heads, self.image, self.caption])
        self.update()

    def update(self) -> None:
        """Redraw the picture and the caption for the controls' values; a refusal shows as the caption."""
        try:
            s = view_settings(self.run, self.token.value, self.layers.value, self.heads.value, self.method.value)
            picture, caption = picture_of(self.run, s, self.holder)
        except InputError as err:
            self.caption.value = f"<b>{html.escape(str(err))}</b>"
            return
        if max(picture.size) > self.max_side:
            picture = picture.copy()
            picture.thumbnail((self.max_side, self.max_side))
        self.image.value = png_bytes(picture)
        self.caption.value = html.escape(caption)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def page_maps(run: AttentionRun, budget: int = PAGE_BUDGET) -> tuple[np.ndarray, bool]:
    """(num_steps, num_layers, heads, n_cells) float32: each token's raw attention on the main view's cells,
    per captured layer and head, and whether heads are kept apart (False: averaged, heads axis of size 1)."""
    cells = int(run.vision.token_positions.size)
    per_head = run.num_steps * run.num_layers * run.num_heads * cells
    per_layer = per_head // run.num_heads
    if per_layer > budget:
        raise InputError(
            f"This run's maps take {per_layer:,} values even with the heads averaged, more than the "
            f"{budget:,} an HTML view holds. Install ipywidgets for the live panel (explore(run) computes in "
            "the kernel), or show single tokens with run.show(...)."
        )
    keep_heads = per_head <= budget
    keys = torch.from_numpy(run.vision.token_positions)
    maps = np.empty((run.num_steps, run.num_layers, run.num_heads if keep_heads else 1, cells), np.float32)
    for t in range(run.num_steps):
        rows = run.step_attention(t)[:, :, keys].float()  # (L, H, cells)
        maps[t] = (rows if keep_heads else rows.mean(dim=1, keepdim=True)).numpy()
    return maps, keep_heads


_PAGE_JS = """
(function () {
  var root = document.getElementById("%(id)s");
  var data = JSON.parse(root.querySelector("script.data").textContent);
  var raw = atob(root.querySelector("script.maps").textContent.trim());
  var bytes = new Uint8Array(raw.length);
  for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  var maps = new Float32Array(bytes.buffer);
  var canvas = root.querySelector("canvas"), ctx = canvas.getContext("2d");
  var base = new Image(), step = 0;
  var L = data.layers.length, H = data.heads_kept, C = data.grid[0] * data.grid[1];
  var inputs = {};
  ["layer-lo", "layer-hi", "head-lo", "head-hi"].forEach(function (name) {
    inputs[name] = root.querySelector("input." + name);
    inputs[name].addEventListener("input", draw);
  });
  function clamp(v, lo, hi) { v = parseInt(v, 10); return isNaN(v) ? lo : Math.min(Math.max(v, lo), hi); }
  function draw() {
    var l0 = clamp(inputs["layer-lo"].value, 0, L - 1), l1 = clamp(inputs["layer-hi"].value, l0, L - 1);
    var h0 = H > 1 ? clamp(inputs["head-lo"].value, 0, H - 1) : 0;
    var h1 = H > 1 ? clamp(inputs["head-hi"].value, h0, H - 1) : 0;
    var heat = new Float64Array(C), n = 0;
    for (var l = l0; l <= l1; l++) for (var h = h0; h <= h1; h++, n++) {
      var at = ((step * L + l) * H + h) * C;
      for (var c = 0; c < C; c++) heat[c] += maps[at + c];
    }
    var lo = Infinity, hi = -Infinity;
    for (var c = 0; c < C; c++) { heat[c] /= n; lo = Math.min(lo, heat[c]); hi = Math.max(hi, heat[c]); }
    ctx.drawImage(base, 0, 0);
    var b = data.box, gw = data.grid[1], gh = data.grid[0];
    ctx.globalAlpha = data.alpha;
    for (var c = 0; c < C; c++) {
      var level = hi > lo ? Math.round(255 * (heat[c] - lo) / (hi - lo)) : 0;
      ctx.fillStyle = "rgb(" + data.lut.slice(3 * level, 3 * level + 3).join(",") + ")";
      var x0 = b[0] + (b[2] - b[0]) * (c %% gw) / gw, x1 = b[0] + (b[2] - b[0]) * (c %% gw + 1) / gw;
      var r = Math.floor(c / gw);
      var y0 = b[1] + (b[3] - b[1]) * r / gh, y1 = b[1] + (b[3] - b[1]) * (r + 1) / gh;
      ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
    }
    ctx.globalAlpha = 1;
    var heads = H > 1 ? "heads " + h0 + "\\u2013" + h1 : "all " + data.num_heads + " heads (averaged in this view)";
    root.querySelector(".caption").textContent = "Token " + step + " " + JSON.stringify(data.tokens[step]) +
      " \\u00b7 layers " + data.layers[l0] + "\\u2013" + data.layers[l1] + " \\u00b7 " + heads + " \\u00b7 mean of " +
      n + " maps \\u00b7 min\\u2013max of this map (" + lo.toPrecision(3) + " to " + hi.toPrecision(3) + ")";
    root.querySelectorAll("button.chip").forEach(function (chip, i) {
      chip.setAttribute("aria-pressed", i === step ? "true" : "false");
    });
  }
  root.querySelector(".tokens").addEventListener("click", function (event) {
    var chip = event.target.closest("button.chip");
    if (chip) { step = parseInt(chip.getAttribute("data-step"), 10); draw(); }
  });
  base.onload = draw;
  base.src = data.image;
})();
"""


class ExplorerPage:
    """A self-contained HTML view of a run (see the module's docstring), shown by Jupyter as HTML; `html` is
    the page's fragment and `save(path)` writes it as a whole page."""

    def __init__(self, run: AttentionRun, max_side: int = 640, budget: int = PAGE_BUDGET, colormap: str = "jet"):
        if run.num_steps == 0:
            raise InputError("This run generated no tokens, so there is no map to explore. Generate again.")
        stored = stored_run(run)
        maps, keep_heads = page_maps(run, budget)
        image = stored.images[0]
        factor = min(1.0, max_side / max(image.size))
        size = (max(1, round(image.size[0] * factor)), max(1, round(image.size[1] * factor)))
        shown = image.convert("RGB").resize(size, Image.BILINEAR)
        box = list(scale_box(run.vision.image_box_xyxy, size[0] / image.size[0], size[1] / image.size[1]))
        base = overlay(shown, np.zeros(run.vision.grid_hw, np.float32), box, alpha=0.0, value_range=(0.0, 1.0))
        self.maps, self.keep_heads = maps, keep_heads
        self.data = {
            "tokens": run.generated_tokens,
            "layers": run.layer_indices,
            "num_heads": run.num_heads,
            "heads_kept": maps.shape[2],
            "grid": list(run.vision.grid_hw),
            "box": box,
            "alpha": 0.5,
            "lut": colormap_lut(colormap).reshape(-1).tolist(),
            "image": "data:image/png;base64," + base64.b64encode(png_bytes(base)).decode("ascii"),
        }
        self.html = self._fragment(run, size)

    def _fragment(self, run: AttentionRun, size: tuple[int, int]) -> str:
        view_id = f"vlm-explorer-{id(self):x}"
        chips = "".join(
            f'<button type="button" class="chip" data-step="{t}" aria-pressed="{str(t == 0).lower()}">'
            f"{t} {html.escape(visible_token(piece))}</button>"
            for t, piece in enumerate(run.generated_tokens)
        )
        last_layer, last_head = run.num_layers - 1, self.maps.shape[2] - 1
        heads = (
            f'heads <input class="head-lo" type="number" min="0" max="{last_head}" value="0"> to '
            f'<input class="head-hi" type="number" min="0" max="{last_head}" value="{last_head}">'
            if self.keep_heads
            else f'<input class="head-lo" type="hidden" value="0"><input class="head-hi" type="hidden" value="0">'
            f"heads: all {run.num_heads}, averaged (the run is too large to keep each head in this view)"
        )
        maps = base64.b64encode(np.ascontiguousarray(self.maps).tobytes()).decode("ascii")
        style = (
            f"<style>#{view_id} button.chip {{ font: 12px monospace; white-space: pre; border: 1px solid #999; "
            f"border-radius: 4px; background: #f4f4f4; cursor: pointer; }} #{view_id} button.chip[aria-pressed=true] "
            f"{{ background: #ffd54f; border-color: #c49000; }} #{view_id} input[type=number] {{ width: 4em; }}</style>"
        )
        return (
            f'<div id="{view_id}" class="vlm-explorer" style="font:13px sans-serif">{style}'
            f'<div class="tokens" style="display:flex;flex-wrap:wrap;gap:3px;margin:4px 0">{chips}</div>'
            f"<div>layers (index in the captured list, 0–{last_layer}) "
            f'<input class="layer-lo" type="number" min="0" max="{last_layer}" value="0"> to '
            f'<input class="layer-hi" type="number" min="0" max="{last_layer}" value="{last_layer}"> · {heads}</div>'
            f'<canvas width="{size[0]}" height="{size[1]}" style="max-width:100%"></canvas>'
            f'<div class="caption"></div>'
            f'<script type="application/json" class="data">{script_json(self.data)}</script>'
            f'<script type="text/plain" class="maps">{maps}</script>'
            f"<script>{_PAGE_JS % {'id': view_id}}</script></div>"
        )

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path) -> str:
        """Write the view as a whole offline page; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Attention explorer</title></head>'
        page = f"{head}<body>{self.html}</body></html>"
        path.write_text(page, encoding="utf-8")
        return str(path)
