"""Self-contained, offline HTML pages, under one Content-Security-Policy and one JSON escaper.

`write_report`: one file per run, with token chips that switch the attention map, the per-token
share of attention on the image as an inline SVG bar chart, and the settings used. `lens_html`:
the logit lens over the image's patches with a layer slider. Images are embedded as data URIs;
every string from the run is escaped for where it lands.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from string import Template

import numpy as np
from PIL import Image

from errors import InputError
from pictures.stored_run import DISPLAY_NORMALIZATIONS, StoredRun, ViewSettings
from pictures.views import plain_text, render, share_table
from records import AttentionRun, LogitLens, cell_edges
from utils import scale_box, scaled_size

logger = logging.getLogger(__name__)
IMAGE_FORMATS: tuple[str, ...] = ("jpeg", "png")
_BAR_W, _BAR_GAP, _PLOT_H, _PAD_L, _PAD_B = 18, 4, 120, 40, 22  # share plot geometry, in px

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.3em; } h2 { font-size: 1em; margin: 0.5em 0 0; } small { font-weight: normal; color: #666; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; }
dt { font-weight: 600; } dd { margin: 0; white-space: pre-wrap; word-break: break-word; }
#tokens { display: flex; flex-wrap: wrap; gap: 4px; margin: 1em 0; }
.chip { font: 13px monospace; white-space: pre; border: 1px solid #999; border-radius: 4px;
        background: #f4f4f4; padding: 2px 6px; cursor: pointer; }
.chip .n { color: #777; margin-right: 4px; }
.chip[aria-pressed=true] { background: #ffd54f; border-color: #c49000; }
#frames img { max-width: 100%; height: auto; border: 1px solid #ccc; } figure { margin: 0; }
figcaption, #status { color: #444; margin: 4px 0; } #plot { overflow-x: auto; }
.bar { cursor: pointer; } .bar .hit { fill: transparent; } .bar .fill { fill: #7a9cc6; }
.bar.sel .fill { fill: #d62728; } .axis { stroke: #bbb; } svg text { font: 10px sans-serif; fill: #555; }
#print { margin: 0.5em 0; } .print-only { display: none; }
#share-table { border-collapse: collapse; margin: 0.5em 0; } #share-table td, #share-table th {
  border: 1px solid #ccc; padding: 1px 6px; font: 12px monospace; text-align: left; white-space: pre; }
/* Printed (or saved as a PDF from the print dialog): the settings, the share plot and its table, then
   every token's map with its caption, one after another, none cut across a page. */
@media print {
  body { margin: 0; max-width: none; font-size: 11px; }
  #tokens, #status, #print, .screen-only { display: none; }
  .print-only { display: block; } table.print-only { display: table; }
  #plot { overflow: visible; } #share-plot { max-width: 100%; height: auto; }
  .bar.sel .fill { fill: #7a9cc6; }
  #frames figure, #frames figure[hidden] { display: block !important; break-inside: avoid; margin: 0 0 10px; }
  #frames img { max-width: 100%; max-height: 45vh; border: none; }
  #share-table { break-inside: auto; } #share-table tr { break-inside: avoid; }
  h2 { break-after: avoid; }
}
"""

# Reads the JSON block with JSON.parse and writes tokens with textContent only: no HTML from data.
_JS = """
(function () {
  var data = JSON.parse(document.getElementById("run-data").textContent);
  var chips = document.querySelectorAll("#tokens .chip");
  var frames = document.querySelectorAll("#frames figure");
  var bars = document.querySelectorAll("#share-plot .bar");
  var status = document.getElementById("status");
  var current = 0;
  function select(step) {
    if (!(step >= 0 && step < frames.length)) return;
    current = step;
    for (var i = 0; i < frames.length; i++) {
      frames[i].hidden = i !== step;
      chips[i].setAttribute("aria-pressed", i === step ? "true" : "false");
      bars[i].classList.toggle("sel", i === step);
    }
    status.textContent = "Token " + step + " of " + data.tokens.length + ": " + JSON.stringify(data.tokens[step]) +
      " \\u00b7 " + (100 * data.shares[step]).toFixed(1) + "% of its attention is on the image";
  }
  function onClick(event) {
    var target = event.target.closest("[data-step]");
    if (target) select(parseInt(target.getAttribute("data-step"), 10));
  }
  document.getElementById("tokens").addEventListener("click", onClick);
  document.getElementById("share-plot").addEventListener("click", onClick);
  document.getElementById("print").addEventListener("click", function () { window.print(); });
  document.addEventListener("keydown", function (event) {
    if (event.key === "ArrowRight") select(current + 1);
    if (event.key === "ArrowLeft") select(current - 1);
  });
  select(0);
})();
"""

# The browser itself refuses any network access and any script or style not inline in the file.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="$csp">
<title>$title</title><style>$css</style></head>
<body>
<h1>$title</h1>
<dl id="settings">$settings</dl>
<button type="button" id="print">Print or save as PDF</button>
<div id="tokens">$chips</div>
<h2>Share of each token's attention on the image
<small class="screen-only">(click a bar or a chip; ← → step)</small></h2>
<div id="plot">$plot</div>
<table id="share-table" class="print-only">$table</table>
<p id="status"></p>
<h2 class="print-only">The map of each token</h2>
<div id="frames">$frames</div>
<script type="application/json" id="run-data">$data</script>
<script>$js</script>
</body></html>
""")


def script_json(value) -> str:
    """JSON that is safe inside <script>: '<', '>' and '&' escaped, so '</script>' cannot end the block."""
    text = json.dumps(value, ensure_ascii=False)
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def visible_token(token: str) -> str:
    """A token as shown on a chip: line breaks and tabs made visible, empty marked. Not yet escaped."""
    return token.replace("\n", "↵").replace("\r", "␍").replace("\t", "⇥") or "∅"


def _data_uri(picture: Image.Image, image_format: str, max_side: int | None) -> str:
    if max_side is not None and max(picture.size) > max_side:
        picture = picture.copy()
        picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    if image_format == "jpeg":
        picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    else:
        buffer.write(png_bytes(picture))
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def png_bytes(picture: Image.Image) -> bytes:
    """The picture as PNG file bytes (what a notebook's `_repr_png_` returns)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def inline_figure(picture: Image.Image, caption: str, alt: str) -> str:
    """The picture embedded as a PNG data URI over its caption, escaped: one figure of HTML for a notebook."""
    return (
        f'<figure style="margin:0"><img src="{_data_uri(picture, "png", None)}" alt="{html.escape(alt)}" '
        f'style="max-width:100%"><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


def _chips(tokens: list[str], ids: list[int]) -> str:
    return "".join(
        f'<button type="button" class="chip" data-step="{t}" aria-pressed="{"true" if t == 0 else "false"}" '
        f'title="step {t}, id {token_id}"><span class="n">{t}</span>{html.escape(visible_token(token))}</button>'
        for t, (token, token_id) in enumerate(zip(tokens, ids, strict=True))
    )


def _frames(uris: list[str], captions: list[str]) -> str:
    return "".join(
        f'<figure data-step="{t}"{"" if t == 0 else " hidden"}><img src="{uri}" alt="attention map for token {t}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for t, (uri, caption) in enumerate(zip(uris, captions, strict=True))
    )


def share_rows(shares: list[float], tokens: list[str], ids: list[int]) -> str:
    """The share plot as a table (what a printed page shows beside the bars): step, token, id, share."""
    head = "<tr><th>step</th><th>token</th><th>id</th><th>on the image</th></tr>"
    return head + "".join(
        f"<tr><td>{t}</td><td>{html.escape(visible_token(token))}</td><td>{token_id}</td><td>{share:.1%}</td></tr>"
        for t, (share, token, token_id) in enumerate(zip(shares, tokens, ids, strict=True))
    )


def share_svg(shares: list[float], tokens: list[str], selected: int = 0) -> str:
    """Bars of each token's attention share on the image (0..1); one <g class="bar"> per token."""
    step_w = _BAR_W + _BAR_GAP
    width, height = _PAD_L + step_w * len(shares) + _BAR_GAP, _PLOT_H + _PAD_B + 8
    parts = [
        f'<svg id="share-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="attention share on the image per token">'
    ]
    for frac in (0.0, 0.5, 1.0):  # y axis: 0 %, 50 %, 100 %
        y = 8 + _PLOT_H * (1 - frac)
        parts.append(
            f'<line class="axis" x1="{_PAD_L - 4}" x2="{width}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{_PAD_L - 6}" y="{y + 3:.1f}" text-anchor="end">{frac:.0%}</text>'
        )
    label_every = 1 if len(shares) <= 40 else 5
    for t, (share, token) in enumerate(zip(shares, tokens, strict=True)):
        x, bar_h = _PAD_L + _BAR_GAP + t * step_w, _PLOT_H * min(max(share, 0.0), 1.0)
        title = html.escape(f"{t}: {token!r} · {share:.1%} on the image")
        label = (
            f'<text x="{x + _BAR_W / 2}" y="{height - 6}" text-anchor="middle">{t}</text>'
            if t % label_every == 0
            else ""
        )
        parts.append(
            f'<g class="bar{" sel" if t == selected else ""}" data-step="{t}"><title>{title}</title>'
            f'<rect class="hit" x="{x}" y="8" width="{_BAR_W}" height="{_PLOT_H}"/>'
            f'<rect class="fill" x="{x}" y="{8 + _PLOT_H - bar_h:.1f}" width="{_BAR_W}" '
            f'height="{bar_h:.1f}"/>{label}</g>'
        )
    return "".join(parts) + "</svg>"


def _settings(run: AttentionRun, s: ViewSettings, image_size: tuple[int, int]) -> str:
    norm = {
        "minmax": "min–max of each map",
        "percentile": f"min to {s.percentile:g}th percentile (clipped)",
        "shared": "one scale shared by all tokens",
    }[s.normalization]
    n_maps = (s.layers[1] - s.layers[0] + 1) * (s.heads[1] - s.heads[0] + 1)
    rows = [
        ("Model", run.model_id),
        ("Family", run.family),
        ("Prompt", run.settings.prompt),
        ("Answer", "".join(run.generated_tokens)),
        ("Layers", f"{s.layers[0]}–{s.layers[1]} (0-based, inclusive)"),
        ("Heads", f"{s.heads[0]}–{s.heads[1]} of {run.num_heads} (0-based, inclusive)"),
        ("Aggregation", f"{s.reduce} of {n_maps} maps"),
        ("Normalisation", norm),
        ("Colormap", f"{s.colormap}, alpha {s.alpha:g}"),
        ("Token grid", "{}×{}".format(*run.vision.grid_hw)),
        ("Image", "{}×{} px".format(*image_size)),
        ("Written", datetime.now(timezone.utc).isoformat(timespec="seconds")),
    ]
    return "".join(f"<dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd>" for name, value in rows)


def _view_settings(
    run: AttentionRun, layers, heads, reduce, normalization, percentile, colormap, alpha, grid
) -> ViewSettings:
    """ViewSettings for every token; None ranges mean everything captured."""
    if normalization not in DISPLAY_NORMALIZATIONS:
        raise InputError(f"Unknown normalisation {normalization!r}; choose one of {DISPLAY_NORMALIZATIONS}.")
    layers = tuple(layers) if layers is not None else (run.layer_indices[0], run.layer_indices[-1])
    heads = tuple(heads) if heads is not None else (0, run.num_heads - 1)
    return ViewSettings(
        layers=layers,
        heads=heads,
        reduce=reduce,
        normalization=normalization,
        percentile=percentile,
        colormap=colormap,
        alpha=alpha,
        grid=grid,
    )


def _as_stored(stored_or_run: StoredRun | AttentionRun, image: Image.Image | None) -> StoredRun:
    """A StoredRun with the image to draw on, checked against the run."""
    if isinstance(stored_or_run, StoredRun):
        stored = stored_or_run if image is None else replace(stored_or_run, images=[image])
    elif image is None and not stored_or_run.images:
        raise ValueError("write_report needs the image the run was generated from when given an AttentionRun.")
    else:
        stored = StoredRun(stored_or_run, images=[image] if image is not None else [])
    if stored.run.num_steps == 0:
        raise InputError("This run generated no tokens, so there is nothing to report. Generate again.")
    if tuple(stored.image.size) != tuple(stored.run.vision.image_size):
        width, height = stored.run.vision.image_size
        raise InputError(
            f"The image is {stored.image.size[0]}x{stored.image.size[1]} px but the run was made "
            f"from a {width}x{height} px image; pass the image the run was generated from."
        )
    return stored


def _page(stored: StoredRun, base: ViewSettings, uris: list[str], captions: list[str]) -> str:
    run = stored.run
    shares = share_table(stored, base.layers, base.heads, 0)["share"]
    data = {
        "model_id": run.model_id,
        "family": run.family,
        "prompt": run.settings.prompt,
        "tokens": run.generated_tokens,
        "ids": run.generated_ids,
        "shares": shares,
        "layers": list(base.layers),
        "heads": list(base.heads),
        "reduce": base.reduce,
        "normalization": base.normalization,
        "vision": run.vision.to_dict(),
    }
    title = f"Attention report · {run.model_id} · {run.settings.prompt[:80]}"
    return _PAGE.substitute(
        title=html.escape(title),
        csp=_CSP,
        css=_CSS,
        js=_JS,
        settings=_settings(run, base, stored.image.size),
        chips=_chips(run.generated_tokens, run.generated_ids),
        frames=_frames(uris, captions),
        plot=share_svg(shares, run.generated_tokens),
        table=share_rows(shares, run.generated_tokens, run.generated_ids),
        data=script_json(data),
    )


def write_report(
    stored_or_run: StoredRun | AttentionRun,
    image: Image.Image | None,
    path: str | Path,
    layers: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    reduce: str = "mean",
    normalization: str = "minmax",
    percentile: float = 99.0,
    colormap: str = "jet",
    alpha: float = 0.5,
    grid: bool = False,
    image_format: str = "jpeg",
    max_side: int | None = 1024,
) -> Path:
    """Write one HTML report for a run and return its path.

    image: the upright image the run was generated from (None when a StoredRun is given).
    layers, heads: 0-based inclusive ranges; None = all captured. reduce: mean | max | min.
    normalization: minmax | percentile | shared. One overlay per generated token is embedded
    (image_format jpeg or png, longest side at most max_side px; None keeps the original size).
    """
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"Unknown image_format {image_format!r}; choose one of {IMAGE_FORMATS}.")
    stored = _as_stored(stored_or_run, image)
    base = _view_settings(stored.run, layers, heads, reduce, normalization, percentile, colormap, alpha, grid)
    uris, captions = [], []
    stored.prepare_answer(base)  # every token's map in one pass
    for step_idx in range(stored.run.num_steps):
        picture, caption = render(stored, replace(base, step_idx=step_idx))
        uris.append(_data_uri(picture, image_format, max_side))
        captions.append(plain_text(caption))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(stored, base, uris, captions), encoding="utf-8")
    logger.info("wrote %s (%d tokens, %.1f MB)", path, stored.run.num_steps, path.stat().st_size / 2**20)
    return path


def lens_html(
    lens: LogitLens,
    image: Image.Image,
    layer_idx: int | None = None,
    mask_blank: bool = True,
    max_side: int = 640,
    special_tokens: tuple[str, ...] = (),
) -> str:
    """A self-contained HTML page: each patch's top token over the image, a layer slider, and the
    top-5 with probabilities on hover. "Hide blank and special tokens" hides whitespace tokens and
    `special_tokens` (the tokenizer's, e.g. `<|im_end|>`). All text is escaped; nothing is fetched."""
    scale = max_side / max(image.size)  # small images grow so labels fit
    shown = image.resize(scaled_size(image.size, scale))
    buffer = io.BytesIO()
    shown.convert("RGB").save(buffer, format="JPEG", quality=85)
    data_uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    xs, ys = cell_edges(lens.grid_hw, scale_box(lens.image_box_xyxy, scale))  # shown-image pixels
    grid_h, grid_w = lens.grid_hw
    confident = lens.most_confident_layer()
    payload = {
        "tokens": lens.top_tokens,
        "probs": np.round(lens.top_probs, 4).tolist(),
        "layers": lens.layer_indices,
        "confident": confident.tolist(),
        "maskBlank": mask_blank,
        "special": sorted(set(special_tokens)),
    }
    data = script_json(payload)
    start = len(lens.layer_indices) - 1 if layer_idx is None else lens.layer_indices.index(layer_idx)
    cells = "".join(
        f'<div class="c" data-j="{r * grid_w + c}" style="left:{xs[c]:.1f}px;top:{ys[r]:.1f}px;'
        f'width:{xs[c + 1] - xs[c]:.1f}px;height:{ys[r + 1] - ys[r]:.1f}px"></div>'
        for r in range(grid_h)
        for c in range(grid_w)
    )
    return _LENS_PAGE.format(
        csp=_CSP,
        width=shown.size[0],
        height=shown.size[1],
        src=html.escape(data_uri, quote=True),
        cells=cells,
        data=data,
        last=len(lens.layer_indices) - 1,
        start=start,
    )


_LENS_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>Logit lens over image patches</title><style>
body{{font-family:sans-serif;margin:12px}} #wrap{{position:relative;width:{width}px;height:{height}px}}
#wrap img{{position:absolute;left:0;top:0}}
.c{{position:absolute;box-sizing:border-box;border:1px solid rgba(255,255,255,.35);
display:flex;align-items:center;justify-content:center;overflow:hidden;font:11px monospace;color:#fff;
text-shadow:0 0 2px #000,0 0 2px #000}} .c.m{{color:transparent;text-shadow:none}}
#tip{{margin-top:8px;white-space:pre;font:13px monospace}}
</style></head><body>
<label>Layer <input id="layer" type="range" min="0" max="{last}" value="{start}"> <span id="ln"></span></label>
<label><input id="mask" type="checkbox"> hide blank and special tokens</label>
<div id="wrap"><img src="{src}" width="{width}" height="{height}" alt="image">{cells}</div>
<div id="tip">Hover a patch to see its top-5 tokens.</div>
<script id="lens-data" type="application/json">{data}</script>
<script>
const D = JSON.parse(document.getElementById('lens-data').textContent);
const slider = document.getElementById('layer'), mask = document.getElementById('mask');
mask.checked = D.maskBlank;
function show() {{
  const l = +slider.value;
  document.getElementById('ln').textContent = D.layers[l];
  document.querySelectorAll('.c').forEach(cell => {{
    const t = D.tokens[l][+cell.dataset.j][0];
    cell.textContent = t;
    cell.classList.toggle('m', mask.checked && (t.trim() === '' || D.special.includes(t)));
  }});
}}
document.querySelectorAll('.c').forEach(cell => cell.addEventListener('mouseenter', () => {{
  const l = +slider.value, j = +cell.dataset.j;
  const lines = D.tokens[l][j].map((t, k) => JSON.stringify(t) + '  ' + (100 * D.probs[l][j][k]).toFixed(1) + '%');
  document.getElementById('tip').textContent = 'layer ' + D.layers[l] + ', cell ' + j + ' (most confident at layer '
    + D.confident[j] + '):\\n' + lines.join('\\n');
}}));
slider.addEventListener('input', show); mask.addEventListener('change', show); show();
</script></body></html>"""
