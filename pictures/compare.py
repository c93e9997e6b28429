"""Two runs side by side: the same image seen by two models (a base and its fine-tune), with two prompts,
or two images of the same size. `compare_runs` matches a token of run A to one of run B (by position or
by text), draws both maps, their difference on a diverging colormap and each run's per-layer share of
attention on the image at that token.

The two maps may sit on different token grids (two families): the difference is taken on the pixels of
the image, each map spread evenly over its cells' pixels and normalised to sum 1 over the pixels its
model saw; a pixel either model never saw has no difference and is hatched.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageChops

from errors import InputError
from pictures.report import inline_figure, png_bytes
from pictures.stored_run import StoredRun, ViewSettings, raw_heatmap
from pictures.views import plain_text, render
from records import AttentionRun, VisionLayout
from utils import scaled_size
from visualization import DIVERGING, hatch, labelled, overlay, side_by_side, with_colorbar

MATCHES: tuple[str, ...] = ("position", "text")


def matched_step(
    a: AttentionRun, b: AttentionRun, step_idx: int, match: str, names: tuple[str, str] = ("A", "B")
) -> int:
    """The token of run `b` that stands for run `a`'s token `step_idx`: the same position, or (by text) the
    token of `b` with the same text nearest that position. `names`: what messages call a and b."""
    one, other = names
    if match not in MATCHES:
        raise InputError(f"Unknown match {match!r}; choose one of {MATCHES}.")
    if not 0 <= step_idx < a.num_steps:
        raise InputError(f"Token {step_idx} is not in run {one}'s answer (tokens 0..{a.num_steps - 1}).")
    if b.num_steps == 0:
        raise InputError(f"Run {other} generated no tokens; generate it again.")
    if match == "position":
        if step_idx >= b.num_steps:
            raise InputError(
                f"Run {other}'s answer has {b.num_steps} tokens, so it has no token {step_idx}; pick a token below "
                f"{b.num_steps}, or match by text."
            )
        return step_idx
    text = a.generated_tokens[step_idx].strip()
    found = [t for t, piece in enumerate(b.generated_tokens) if piece.strip() == text]
    if not found:
        raise InputError(
            f"Run {one}'s token {step_idx} ({text!r}) is not in run {other}'s answer "
            f"({''.join(b.generated_tokens)[:120]!r}); match by position, or pick another token."
        )
    return min(found, key=lambda t: (abs(t - step_idx), t))


def pixel_density(layout: VisionLayout, heat: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """(H, W) float64 on a raster of `size_wh` pixels over the original image: each cell's mass spread evenly
    over the raster pixels whose centres fall in it, normalised to sum 1 over the pixels the model saw;
    NaN on the pixels outside its grid's box."""
    width, height = size_wh
    image_w, image_h = layout.image_size
    xs, ys = layout.cell_edges()
    px = (np.arange(width) + 0.5) * image_w / width  # pixel centres in original pixels
    py = (np.arange(height) + 0.5) * image_h / height
    col = np.searchsorted(xs, px, side="right") - 1
    row = np.searchsorted(ys, py, side="right") - 1
    col_ok, row_ok = (col >= 0) & (col < layout.grid_hw[1]), (row >= 0) & (row < layout.grid_hw[0])
    seen = row_ok[:, None] & col_ok[None, :]
    cell = np.where(seen, np.clip(row, 0, None)[:, None] * layout.grid_hw[1] + np.clip(col, 0, None)[None, :], 0)
    flat = np.asarray(heat, np.float64).reshape(-1)
    counts = np.bincount(cell[seen], minlength=flat.size)  # raster pixels per cell
    spread = np.where(counts > 0, flat / np.maximum(counts, 1), 0.0)
    density = np.where(seen, spread[cell], np.nan)
    total = np.nansum(density)
    return density / total if total > 0 else density


def share_curves_svg(curves: dict[str, tuple[list[int], np.ndarray]], width: int = 420, height: int = 180) -> str:
    """Per-layer image-share lines (0..1), one per run, as an inline SVG with a legend; numbers only."""
    colors = ("#1f77b4", "#d62728")
    pad_l, pad_b, pad_t = 36, 22, 8
    layers = [layer for xs, _ in curves.values() for layer in xs]
    lo, hi = min(layers), max(max(layers), min(layers) + 1)
    plot_w, plot_h = width - pad_l - 90, height - pad_b - pad_t
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="image share per layer">']
    for frac in (0.0, 0.5, 1.0):
        y = pad_t + plot_h * (1 - frac)
        parts.append(
            f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{pad_l - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{frac:.0%}</text>'
        )
    parts.append(
        f'<text x="{pad_l}" y="{height - 6}" font-size="10">layer {lo}</text>'
        f'<text x="{pad_l + plot_w}" y="{height - 6}" font-size="10" text-anchor="end">layer {hi}</text>'
    )
    for index, (name, (xs, ys)) in enumerate(curves.items()):
        points = " ".join(
            f"{pad_l + plot_w * (x - lo) / (hi - lo):.1f},{pad_t + plot_h * (1 - min(max(float(y), 0), 1)):.1f}"
            for x, y in zip(xs, ys, strict=True)
        )
        color = colors[index % len(colors)]
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(
            f'<text x="{pad_l + plot_w + 8}" y="{pad_t + 14 + 16 * index}" font-size="11" fill="{color}">'
            f"{html.escape(name)}</text>"
        )
    return "".join(parts) + "</svg>"


@dataclass
class Comparison:
    """Run A's token against run B's matched token. Maps are raw attention on each run's own grid; the
    densities and their difference are on a raster over the image (NaN: a pixel that run did not see)."""

    what: str  # "two models", "two prompts", "two images", or "two runs"
    step_a: int
    step_b: int
    token_a: str
    token_b: str
    heat_a: np.ndarray  # (grid_h, grid_w) of run A
    heat_b: np.ndarray  # (grid_h', grid_w') of run B
    density_a: np.ndarray  # (H, W), sums to 1 over the pixels A saw
    density_b: np.ndarray
    difference: np.ndarray  # density_a - density_b; NaN where either did not see
    layers_a: list[int]  # the captured layers in A's range
    shares_a: np.ndarray  # (len(layers_a),) share of the token's attention on the image per layer, heads averaged
    layers_b: list[int]
    shares_b: np.ndarray
    picture: Image.Image = field(repr=False)
    caption: str = ""

    def _repr_png_(self) -> bytes:
        return png_bytes(self.picture)

    def _repr_html_(self) -> str:
        curves = {"A": (self.layers_a, self.shares_a), "B": (self.layers_b, self.shares_b)}
        return (
            inline_figure(self.picture, self.caption, "two maps and their difference")
            + "<div><small>Share of the token's attention on the image, per layer (heads averaged)</small><br>"
            f"{share_curves_svg(curves)}</div>"
        )


def what_differs(a: AttentionRun, b: AttentionRun) -> str:
    """Which of model, prompt and image the two runs differ in, in words."""
    differs = []
    if a.model_id != b.model_id:
        differs.append("models")
    if a.settings.prompt != b.settings.prompt:
        differs.append("prompts")
    if (
        a.images
        and b.images
        and ImageChops.difference(a.images[0].convert("RGB"), b.images[0].convert("RGB")).getbbox()
    ):
        differs.append("images")
    return "two " + (" and ".join(differs) if differs else "runs")


def _as_stored(run) -> StoredRun:
    return run if isinstance(run, StoredRun) else StoredRun(run)


def _ranges(run: AttentionRun, layers, heads) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ranges inside what the run captured: None is everything, a range past the run is clipped to it."""
    first, last = run.layer_indices[0], run.layer_indices[-1]
    layers = (first, last) if layers is None else (max(first, int(layers[0])), min(last, int(layers[1])))
    heads = (0, run.num_heads - 1) if heads is None else (max(0, int(heads[0])), min(run.num_heads - 1, int(heads[1])))
    if layers[0] > layers[1] or heads[0] > heads[1]:
        raise InputError(
            f"The ranges fall outside run {run.model_id!r}'s layers {first}–{last} and heads 0–{run.num_heads - 1}; "
            "pick ranges inside them."
        )
    return layers, heads


def _layer_shares(stored: StoredRun, step: int, layers, heads) -> tuple[list[int], np.ndarray]:
    run = stored.run
    picked = [i for i, layer in enumerate(run.layer_indices) if layers[0] <= layer <= layers[1]]
    shares = stored.shares[step][picked][:, heads[0] : heads[1] + 1].mean(axis=1)
    return [run.layer_indices[i] for i in picked], shares.astype(np.float32)


def compare_runs(
    a: StoredRun | AttentionRun,
    b: StoredRun | AttentionRun,
    step_idx: int = 0,
    match: str = "position",
    layers=None,
    heads=None,
    layers_b=None,
    heads_b=None,
    reduce: str = "mean",
    colormap: str = "jet",
    alpha: float = 0.5,
    max_side: int = 512,
    step_in: str = "a",
) -> Comparison:
    """Run A's token `step_idx` against the token of run B it matches (`match`: position or text).

    layers, heads: A's 0-based inclusive ranges (None: all captured); B takes `layers_b`, `heads_b`, or else
    the same ranges clipped to what B captured (two models may have different depths). Both runs must be of
    one image size; with several images, the first image's main view is compared. With step_in="b",
    `step_idx` is run B's token and run A's is the one matched to it."""
    stored_a, stored_b = _as_stored(a), _as_stored(b)
    run_a, run_b = stored_a.run, stored_b.run
    if tuple(run_a.vision.image_size) != tuple(run_b.vision.image_size):
        raise InputError(
            "The two runs were made from images of different sizes ({}×{} and {}×{} px); compare runs of one "
            "image, or of two images of the same size.".format(*run_a.vision.image_size, *run_b.vision.image_size)
        )
    if run_a.vision.num_frames > 1 or run_b.vision.num_frames > 1:
        raise InputError("Comparing videos is not supported; compare two runs on images.")
    if step_in not in ("a", "b"):
        raise InputError(f"step_in is 'a' or 'b' (whose token step_idx is), not {step_in!r}.")
    if step_in == "b":
        step_idx, step_b = matched_step(run_b, run_a, int(step_idx), match, names=("B", "A")), int(step_idx)
    else:
        step_b = matched_step(run_a, run_b, int(step_idx), match)
    ranges_a = _ranges(run_a, layers, heads)
    ranges_b = _ranges(run_b, layers_b if layers_b is not None else ranges_a[0], heads_b or ranges_a[1])
    look = dict(reduce=reduce, colormap=colormap, alpha=alpha)
    s_a = ViewSettings(step_idx=int(step_idx), layers=ranges_a[0], heads=ranges_a[1], **look)
    s_b = ViewSettings(step_idx=step_b, layers=ranges_b[0], heads=ranges_b[1], **look)
    heat_a, heat_b = raw_heatmap(stored_a, s_a), raw_heatmap(stored_b, s_b)
    shown, _ = stored_a.display(0)
    size = scaled_size(shown.size, min(1.0, max_side / max(shown.size)))
    density_a = pixel_density(run_a.vision, heat_a, size)
    density_b = pixel_density(run_b.vision, heat_b, size)
    difference = density_a - density_b  # NaN where either is NaN
    picture_a, caption_a = render(stored_a, s_a)
    picture_b, caption_b = render(stored_b, s_b)
    picture = _figure(shown.resize(size, Image.BILINEAR), picture_a, picture_b, difference, run_a, run_b)
    what = what_differs(run_a, run_b)
    top = float(np.nanmax(np.abs(difference))) if np.isfinite(difference).any() else 0.0
    caption = (
        f"{what}: A {run_a.model_id!r} on {run_a.settings.prompt!r}, token {step_idx} "
        f"{run_a.generated_tokens[int(step_idx)]!r}; B {run_b.model_id!r} on {run_b.settings.prompt!r}, token {step_b} "
        f"{run_b.generated_tokens[step_b]!r} (matched by {match}). A: {plain_text(caption_a)} "
        f"B: {plain_text(caption_b)} "
        f"A − B: each map spread over its cells' pixels and normalised to sum 1 over the pixels its model saw; red "
        f"where A puts more of its attention, blue where B does (largest difference {top:.3g} per pixel); hatched "
        "where either model saw nothing."
    )
    return Comparison(
        what,
        int(step_idx),
        step_b,
        run_a.generated_tokens[int(step_idx)],
        run_b.generated_tokens[step_b],
        heat_a,
        heat_b,
        density_a,
        density_b,
        difference,
        *_layer_shares(stored_a, int(step_idx), *ranges_a),
        *_layer_shares(stored_b, step_b, *ranges_b),
        picture=picture,
        caption=caption,
    )


def _figure(base: Image.Image, picture_a, picture_b, difference: np.ndarray, run_a, run_b) -> Image.Image:
    """A's map, B's map and A − B side by side at one height, each labelled."""
    seen = np.isfinite(difference)
    top = float(np.abs(difference[seen]).max()) if seen.any() else 0.0
    top = top or 1.0
    unit = np.where(seen, 0.5 + 0.5 * np.nan_to_num(difference) / top, 0.5).astype(np.float32)
    drawn = overlay(
        base, unit, (0, 0, *base.size), colormap=DIVERGING, alpha=0.85, interpolation="nearest", value_range=(0.0, 1.0)
    )
    drawn = with_colorbar(hatch(drawn, ~seen), DIVERGING, (-top, top), "A - B, share per pixel")
    height = max(picture_a.size[1], picture_b.size[1], drawn.size[1])
    panels = [
        labelled(_to_height(picture, height), label)
        for picture, label in (
            (picture_a, _label("A", run_a)),
            (picture_b, _label("B", run_b)),
            (drawn, "A - B (red: more in A, blue: more in B)"),
        )
    ]
    return side_by_side(side_by_side(panels[0], panels[1]), panels[2])


def _label(name: str, run: AttentionRun) -> str:
    prompt = run.settings.prompt if len(run.settings.prompt) <= 40 else run.settings.prompt[:39] + "…"
    return f"{name}: {run.model_id} · {prompt}"


def _to_height(picture: Image.Image, height: int) -> Image.Image:
    if picture.size[1] == height:
        return picture
    return picture.resize((max(1, round(picture.size[0] * height / picture.size[1])), height), Image.BILINEAR)
