"""Logit lens over image patches: what each vision token's hidden state would predict, layer by layer.

A teacher-forced forward over the prompt records every decoder layer's output at the vision
positions (forward hooks, pre-norm), then decodes each through the final norm and `lm_head` once.
`lens_html` draws the result as a self-contained, interactive HTML page.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from families import decoder_layers, vision_layout
from records import cell_edges
from utils import load_image


@dataclass
class LogitLens:
    """Top-k predictions per decoder layer and vision token of one image. Indices are 0-based.

    layer_indices: the decoder layers, axis 0 (layer i means the output of decoder layer i; the
        embedding output is not a layer).
    top_ids: (num_layers, n_cells, k) int64; top_probs: (num_layers, n_cells, k) float32.
    top_tokens: [layer][cell][k] decoded strings. Cell j is grid cell (j // grid_w, j % grid_w).
    """

    layer_indices: list[int]
    top_ids: np.ndarray
    top_probs: np.ndarray
    top_tokens: list[list[list[str]]]
    grid_hw: tuple[int, int]
    image_box_xyxy: tuple[float, float, float, float]
    tracked: np.ndarray | None = None          # (num_layers, n_cells, n_tracked) probabilities of track_ids

    def token_map(self, index: int = 0) -> np.ndarray:
        """(grid_h, grid_w): each patch's probability of tracked token `index`, averaged over layers."""
        if self.tracked is None:
            raise ValueError("No token was tracked; pass track_ids to logit_lens.")
        return self.tracked[:, :, index].mean(axis=0).reshape(self.grid_hw).astype(np.float32)

    def most_confident_layer(self) -> np.ndarray:
        """(n_cells,) the layer index where each cell's top-1 probability peaks."""
        return np.asarray(self.layer_indices)[self.top_probs[:, :, 0].argmax(axis=0)]


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output           # (B, S, hidden)


def logit_lens(holder, image, prompt: str, top_k: int = 5, chunk: int = 256, track_ids: list[int] | None = None,
               min_pixels: int | None = None, max_pixels: int | None = None) -> LogitLens:
    """Decode every decoder layer's hidden state at the image's vision tokens (first image).

    track_ids: token ids whose probability to keep at every layer and cell (`LogitLens.tracked`).
    min_pixels / max_pixels: the image-token budget; pass a run's own (`run.settings`) so the lens
        covers the same token grid as the run's maps.
    """
    image = load_image(image)
    inputs = holder.build_inputs(image, prompt, min_pixels, max_pixels)
    layout = vision_layout(holder.family, holder.model.config, holder.processor, inputs, image.size)
    positions = torch.from_numpy(layout.token_positions)                # (n_cells,)
    layers = decoder_layers(holder.model)
    states: dict[int, torch.Tensor] = {}

    def keep(idx):
        def hook(module, args, output):
            states[idx] = _layer_output(output)[0, positions.to(_layer_output(output).device)].detach()
        return hook
    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            holder.model(**holder.on_model(inputs))
    finally:
        for handle in handles:
            handle.remove()
    norm, head = holder.model.model.language_model.norm, holder.model.get_output_embeddings()
    top_ids, top_probs, tracked = [], [], []
    with torch.inference_mode():
        for idx in range(len(layers)):
            ids, probs, kept = [], [], []
            for start in range(0, len(positions), chunk):                # bounded (chunk, vocab) logits
                distribution = torch.softmax(head(norm(states[idx][start:start + chunk])).float(), dim=-1)
                best = distribution.topk(top_k, dim=-1)                  # (c, k)
                ids.append(best.indices.cpu())
                probs.append(best.values.cpu())
                kept.append(distribution[:, list(track_ids or [])].cpu())  # (c, n_tracked)
            top_ids.append(torch.cat(ids))
            top_probs.append(torch.cat(probs))
            tracked.append(torch.cat(kept))
    top_ids = torch.stack(top_ids).numpy()                              # (L, n_cells, k)
    decode = _decoder(holder.processor.tokenizer)
    tokens = [[[decode(int(i)) for i in cell] for cell in layer] for layer in top_ids]
    return LogitLens(list(range(len(layers))), top_ids, torch.stack(top_probs).numpy(), tokens,
                     layout.grid_hw, layout.image_box_xyxy, torch.stack(tracked).numpy() if track_ids else None)


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]
    return decode


def lens_html(lens: LogitLens, image: Image.Image, layer_idx: int | None = None, mask_blank: bool = True,
              max_side: int = 640) -> str:
    """A self-contained HTML page: each patch's top token over the image, a layer slider, and the
    top-5 with probabilities on hover. All text is escaped; nothing is fetched from the network."""
    scale = max_side / max(image.size)                                  # small images grow so labels fit
    shown = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)))
    buffer = io.BytesIO()
    shown.convert("RGB").save(buffer, format="JPEG", quality=85)
    data_uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    xs, ys = cell_edges(lens.grid_hw, [v * scale for v in lens.image_box_xyxy])  # shown-image pixels
    grid_h, grid_w = lens.grid_hw
    confident = lens.most_confident_layer()
    payload = {"tokens": lens.top_tokens, "probs": np.round(lens.top_probs, 4).tolist(),
               "layers": lens.layer_indices, "confident": confident.tolist(), "maskBlank": mask_blank}
    data = json.dumps(payload).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    start = len(lens.layer_indices) - 1 if layer_idx is None else lens.layer_indices.index(layer_idx)
    cells = "".join(
        f'<div class="c" data-j="{r * grid_w + c}" style="left:{xs[c]:.1f}px;top:{ys[r]:.1f}px;'
        f'width:{xs[c + 1] - xs[c]:.1f}px;height:{ys[r + 1] - ys[r]:.1f}px"></div>'
        for r in range(grid_h) for c in range(grid_w))
    return _PAGE.format(width=shown.size[0], height=shown.size[1], src=html.escape(data_uri, quote=True),
                        cells=cells, data=data, last=len(lens.layer_indices) - 1, start=start)


_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>Logit lens over image patches</title><style>
body{{font-family:sans-serif;margin:12px}} #wrap{{position:relative;width:{width}px;height:{height}px}}
#wrap img{{position:absolute;left:0;top:0}}
.c{{position:absolute;box-sizing:border-box;border:1px solid rgba(255,255,255,.35);
display:flex;align-items:center;justify-content:center;overflow:hidden;font:11px monospace;color:#fff;
text-shadow:0 0 2px #000,0 0 2px #000}} .c.m{{color:transparent;text-shadow:none}}
#tip{{margin-top:8px;white-space:pre;font:13px monospace}}
</style></head><body>
<label>Layer <input id="layer" type="range" min="0" max="{last}" value="{start}"> <span id="ln"></span></label>
<label><input id="mask" type="checkbox"> hide blank tokens</label>
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
    cell.classList.toggle('m', mask.checked && t.trim() === '');
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
