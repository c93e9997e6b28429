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


# ---- token switch: stores at the public shapes -------------------------------------------------

# Decoder shapes of the public Qwen2.5-VL checkpoints (layers, heads, KV heads, head dim).
TEXT_DIMS = {"7b": (28, 28, 4, 128), "32b": (64, 40, 8, 128), "3b": (36, 16, 2, 128)}
PATCH = 28  # px of one Qwen2.5-VL image token (14 px patches merged 2 x 2)


class LegacyQueryKeyStore:
    """The token switch as it was before stores computed rows in place: every layer's keys converted to
    a fresh float32 copy and multiplied, one token at a time, the result stacked and halved. Kept here to
    measure the new store against it in the same run."""

    def __init__(self, store):
        self.store, self._cache = store, {}

    def step(self, step_idx: int) -> torch.Tensor:
        if step_idx in self._cache:
            return self._cache[step_idx]
        row, kv_len = self.store.num_prompt_rows + step_idx, self.store.prompt_len + step_idx
        rows = []
        for layer in self.store.layers:
            num_heads, _, head_dim = layer.queries.shape
            num_kv = layer.keys.shape[0]
            grouped = layer.queries[:, row : row + 1].float().reshape(num_kv, num_heads // num_kv, head_dim)
            scores = torch.matmul(grouped, layer.keys[:, :kv_len].float().transpose(1, 2)) * layer.scaling
            scores = scores.view(num_heads, 1, kv_len)
            hidden = torch.arange(kv_len)[None, :] > self.store.query_pos[row : row + 1, None]
            rows.append(torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)[:, 0])
        self._cache = {step_idx: torch.stack(rows).to(torch.float16)}
        return self._cache[step_idx]


def public_store(dims: str, side: int, steps: int, device: str = "cpu"):
    """A query-key store with the shapes a Qwen2.5-VL generation at `dims` would leave for a side² image
    (random bf16 queries and keys, a 40-token question), and its run."""
    from attention_store import LayerRecord, QueryKeyStore

    num_layers, num_heads, num_kv, head_dim = TEXT_DIMS[dims]
    grid = side // PATCH
    cells, text = grid * grid, 40
    prompt_len = cells + text
    generator = torch.Generator().manual_seed(side)
    layers = []
    for _ in range(num_layers):
        queries = torch.randn(num_heads, steps, head_dim, generator=generator).to(device, torch.bfloat16)
        keys = torch.randn(num_kv, prompt_len + steps - 1, head_dim, generator=generator).to(device, torch.bfloat16)
        layers.append(LayerRecord(queries, keys, head_dim**-0.5))
    query_pos = torch.arange(prompt_len - 1, prompt_len - 1 + steps)
    shares = {"vision": torch.zeros(steps, num_layers, num_heads), "system": torch.zeros(steps, num_layers, num_heads)}
    store = QueryKeyStore(layers, query_pos, 0, prompt_len, shares, placement=f"queries and keys on {device}")
    layout = VisionLayout(np.arange(15, 15 + cells), (grid, grid), (side, side), (0.0, 0.0, side, side), (side, side))
    run = AttentionRun(
        [0] * prompt_len,
        list(range(steps)),
        [f"tok{t}" for t in range(steps)],
        layout,
        list(range(num_layers)),
        num_heads,
        store,
        model_id=f"random Qwen2.5-VL {dims} store",
        family="qwen2_5_vl",
    )
    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def token_switch(
    dims: str, side: int, device: str = "cpu", steps: int = 64, repeats: int = 5, pause_s: float = 1.0
) -> dict:
    """`switch_timings` on a store at the public shapes of `dims` for a side² image."""
    run = public_store(dims, side, steps, device)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    return {"dims": dims, "image": side, **switch_timings(run, image, device, repeats, pause_s)}


def switch_timings(run: AttentionRun, image, device: str = "cpu", repeats: int = 5, pause_s: float = 1.0) -> dict:
    """Milliseconds of a token switch (the map of a token over all layers and heads): the first token viewed;
    a token not viewed before and not next to one (a jump; median); the next token after a view and a
    `pause_s` pause, in which the idle prefetch computes it (median); a token viewed already (median); the
    animation's maps and frames; and, for a store on the host, a first and a new token by the old method,
    which had no prefetch."""
    from attention_processor import token_heatmap
    from pictures.views import animation_frames

    steps = run.num_steps
    everything = dict(layers=(run.layer_indices[0], run.layer_indices[-1]), heads=(0, run.num_heads - 1))
    store = run.attention

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return (time.perf_counter() - start) * 1000

    store._cache.clear()
    first = timed(lambda: token_heatmap(run, 0, **everything))
    jumps = list(range(2, steps, 3))[:repeats]  # never next to another
    fresh = [timed(lambda t=t: token_heatmap(run, t, **everything)) for t in jumps]
    cached = [timed(lambda: token_heatmap(run, jumps[-1], **everything)) for _ in range(repeats)]
    store._cache.clear()
    store.prefetch = True  # as the app has it: the next tokens are computed while the reader looks
    following = []
    for t in list(range(0, steps - 1, 4))[:repeats]:
        token_heatmap(run, t, **everything)
        time.sleep(pause_s)
        following.append(timed(lambda t=t: token_heatmap(run, t + 1, **everything)))
    store.prefetch = False
    row = {
        "device": device,
        "placement": store.placement,
        "tokens": steps,
        "first_ms": first,
        "jump_ms": statistics.median(fresh),
        "next_ms": statistics.median(following),
        "pause_s": pause_s,
        "cached_ms": statistics.median(cached),
    }
    if store.device.type == "cpu":
        legacy = LegacyQueryKeyStore(store)
        row["old_first_ms"] = timed(lambda: legacy.step(0))
        row["old_next_ms"] = statistics.median([timed(lambda t=t: legacy.step(t)) for t in jumps])
    stored = StoredRun(run, images=[image])
    settings = ViewSettings(step_idx=0, normalization="shared", **everything)
    row["maps_all_tokens_ms"] = timed(lambda: token_heatmap(run, list(range(steps)), **everything))
    frames: list = []
    row["animation_ms"] = timed(lambda: frames.extend(animation_frames(stored, settings)))
    row["frames"] = len(frames)
    return row


def print_token_switch(row: dict) -> None:
    print(
        f"# {row.get('dims', '')} store, {row['image']}² image, {row['tokens']} tokens, {row['placement']}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"token switch first={row['first_ms']:.1f} ms next={row['next_ms']:.1f} ms cached={row['cached_ms']:.1f} ms "
        f"jump={row['jump_ms']:.1f} ms"
    )
    print(
        f"  next: the following token, after a {row['pause_s']:.1f} s pause (prefetched while idle); jump: a token "
        "computed on the spot"
    )
    if "old_next_ms" in row:
        print(
            f"old method (a float32 copy of every key per token, no prefetch): first={row['old_first_ms']:.1f} ms "
            f"next={row['old_next_ms']:.1f} ms → next {row['old_next_ms'] / row['next_ms']:.1f}× faster now, "
            f"a jump {row['old_next_ms'] / row['jump_ms']:.2f}×"
        )
    print(
        f"{row['tokens']}-token animation: {row['animation_ms'] / 1000:.2f} s ({row['frames']} frames, shared scale); "
        f"every token's map in one pass: {row['maps_all_tokens_ms']:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--token-switch", action="store_true", help="time token switches on a store at public shapes")
    parser.add_argument("--dims", choices=sorted(TEXT_DIMS), default="7b", help="--token-switch: decoder shapes")
    parser.add_argument("--image", type=int, default=1008, help="--token-switch: square image side, px")
    parser.add_argument("--store-device", default="cpu", help="--token-switch: where the store lives (cpu, cuda)")
    args = parser.parse_args()
    if args.token_switch:
        print_token_switch(token_switch(args.dims, args.image, args.store_device, repeats=min(args.repeats, 5)))
        return
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
