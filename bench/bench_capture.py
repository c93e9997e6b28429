"""Wall time and peak memory of attention capture against plain generation and the eager method.

Builds a random-weight Qwen2.5-VL with real proportions (sized for a CPU by default; every
dimension is a flag) and, for each image size, runs side by side in fresh worker processes:

  plain  - SDPA generation, no attention kept (the floor)
  ours   - ModelHolder.generate with the default SDPA capture
  eager  - eager attention with generate(output_attentions=True), what other tools do

Peak memory is the growth of the worker's peak RSS during one generation, over its RSS just
before it (model weights excluded). Time is the median of --repeats generations after that.

    python bench/bench_capture.py                  # CPU defaults, about 10 minutes on 2 cores
    python bench/bench_capture.py --sizes 448 --new-tokens 8 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
METHODS = ("plain", "ours", "eager")


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _image(side: int):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(side)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def worker(model_dir: str, method: str, side: int, new_tokens: int, repeats: int) -> dict:
    """One method at one size in this process: peak memory of the first run, then timed runs."""
    import torch
    from model_holder import ModelHolder
    holder = ModelHolder.load(model_dir, device="cpu", dtype="float32")
    image, prompt = _image(side), "Describe the image."
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    grid_thw = holder.build_inputs(image, prompt)["image_grid_thw"][0]
    if method == "eager":
        holder.model.set_attn_implementation({"text_config": "eager"})

    def once():
        with torch.inference_mode():
            if method == "ours":
                return holder.generate(image, prompt, **fixed).nbytes
            inputs = holder.build_inputs(image, prompt)      # every method pays for preprocessing
            out = holder.model.generate(**inputs, **fixed, output_attentions=method == "eager",
                                        return_dict_in_generate=True)
            if method == "eager":
                return sum(a.numel() * a.element_size() for step in out.attentions for a in step)
            return 0
    rss_before = _rss_kb()
    stored = once()
    peak_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {"method": method, "side": side, "vision_tokens": int(grid_thw.prod()) // 4,
            "seconds": statistics.median(times), "peak_mb": peak_growth_mb, "stored_mb": stored / 2**20}


def _run_worker(model_dir: str, method: str, side: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", model_dir, method, str(side),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Capture overhead against plain SDPA and eager attention.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 728, 1008], help="square image sides, px")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vision-dim", type=int, default=128)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "METHOD", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]), args.new_tokens, args.repeats)))
        return

    from tiny_models import make_tiny_model
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model("qwen2_5_vl", tmp, sharpen=1.0, max_pixels=max(args.sizes) ** 2 + 28 * 28,
                        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                        vision_dim=args.vision_dim, vision_depth=args.vision_depth, intermediate=int(args.hidden * 5.4))
        print(f"# Qwen2.5-VL, random weights: text hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
              f"({args.kv_heads} KV), vision dim {args.vision_dim} x {args.vision_depth}; {args.new_tokens} new tokens")
        print(f"# {platform.processor() or platform.machine()}, {platform.system()}, torch threads: default")
        print("| image | vision tokens | method | time s | time × plain | peak MB | peak × plain | stored MB |")
        print("|---|---|---|---|---|---|---|---|")
        for side in args.sizes:
            results = {method: _run_worker(tmp, method, side, args) for method in METHODS}
            base = results["plain"]
            for method in METHODS:
                r = results[method]
                print(f"| {side}² | {r['vision_tokens']} | {method} | {r['seconds']:.2f} | "
                      f"{r['seconds'] / base['seconds']:.2f}× | {r['peak_mb']:.0f} | "
                      f"{r['peak_mb'] / max(base['peak_mb'], 1):.2f}× | {r['stored_mb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
