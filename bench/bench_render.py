"""Server-side re-render time for one slider move, at 1024×768.

A slider move runs `views.render` (heatmap over the layer/head range, normalisation, colormap
overlay at the original size) and `views.share_table` (the per-token plot), and then the
picture is encoded for the browser. The run has the
shape a Qwen2.5-VL-7B generation would have for a 1024×768 image (28 layers × 28 heads, a
27×37 token grid, 64 generated tokens); its attention values are random, which does not change
the cost. Prints the median time per view and the JPEG-vs-PNG encoding ratio.

    python bench/bench_render.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pictures.stored_run import StoredRun, ViewSettings
from pictures.views import render, share_table
from records import (
    AttentionRun,  # noqa: E402
    VisionLayout,  # noqa: E402
)

LAYERS, HEADS, GRID_HW, PROMPT_TEXT, STEPS = 28, 28, (27, 37), 40, 64


def synthetic_run(image_size=(1024, 768)) -> AttentionRun:
    n_cells = GRID_HW[0] * GRID_HW[1]
    prompt_len = n_cells + PROMPT_TEXT
    generator = torch.Generator().manual_seed(0)
    rows = [
        torch.softmax(torch.randn(LAYERS, HEADS, prompt_len + t, generator=generator) * 3, -1).half()
        for t in range(STEPS)
    ]
    layout = VisionLayout(
        np.arange(15, 15 + n_cells),
        GRID_HW,
        image_size,
        (0.0, 0.0, *map(float, image_size)),
        (GRID_HW[0] * 28, GRID_HW[1] * 28),
    )
    return AttentionRun(
        [0] * prompt_len,
        list(range(STEPS)),
        [f"tok{t}" for t in range(STEPS)],
        layout,
        list(range(LAYERS)),
        HEADS,
        rows,
        model_id="synthetic",
        family="qwen2_5_vl",
    )


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _encode(picture: Image.Image, fmt: str) -> int:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    stored = StoredRun(synthetic_run(), images=[image])
    base = ViewSettings(step_idx=5, layers=(10, 20), heads=(0, 27))
    cases = {
        "overlay, layers 10-20, all heads, minmax": base,
        "overlay, all layers and heads, max": ViewSettings(step_idx=5, layers=(0, 27), heads=(0, 27), reduce="max"),
        "overlay + token grid": ViewSettings(step_idx=5, layers=(10, 20), heads=(0, 27), grid=True),
        "side by side": ViewSettings(step_idx=5, layers=(10, 20), heads=(0, 27), view="side_by_side"),
        "heatmap only, percentile": ViewSettings(
            step_idx=5, layers=(10, 20), heads=(0, 27), view="heatmap", normalization="percentile"
        ),
        "shared scale (cached after first move)": ViewSettings(
            step_idx=5, layers=(10, 20), heads=(0, 27), normalization="shared"
        ),
    }
    render(stored, cases["shared scale (cached after first move)"])  # fill the cache once
    picture, _ = render(stored, base)
    jpeg_ms = _median_ms(lambda: _encode(picture, "JPEG"), args.repeats)
    png_ms = _median_ms(lambda: _encode(picture, "PNG"), max(3, args.repeats // 5))
    print(
        f"# 1024x768 image, {LAYERS} layers x {HEADS} heads, grid {GRID_HW}, {STEPS} tokens; "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| view | render ms | + JPEG encode ms | total ms |")
    print("|---|---|---|---|")
    for name, settings in cases.items():
        render_ms = _median_ms(
            lambda s=settings: (render(stored, s), share_table(stored, s.layers, s.heads, s.step_idx)), args.repeats
        )
        print(f"| {name} | {render_ms:.1f} | {jpeg_ms:.1f} | {render_ms + jpeg_ms:.1f} |")
    print(
        f"\nEncoding the picture: JPEG {jpeg_ms:.1f} ms vs PNG {png_ms:.1f} ms → PNG is {png_ms / jpeg_ms:.1f}× "
        "slower; the app sends JPEG and offers PNG only as a download."
    )


if __name__ == "__main__":
    main()
