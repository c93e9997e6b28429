"""Wall time and peak memory of attention capture against plain generation and the eager method.

Three methods run side by side at each image size:

  plain  - SDPA generation, no attention kept (the floor)
  ours   - ModelHolder.generate with the default capture (rows rebuilt after generation)
  eager  - eager attention with generate(output_attentions=True), what other tools do

On the CPU (default) the model is a random-weight Qwen2.5-VL with real proportions, sized for a
small machine (every dimension is a flag), saved once and loaded in fresh worker processes: one
per method and size for peak memory (the growth of the worker's peak RSS during one generation,
median over --peak-runs workers),
and one per size that times all three methods in turns (the order rotating each round), so
drifting load on a shared machine and one method's freed memory hit them alike.

With --device cuda the model has the public Qwen2.5-VL configs' dimensions (--dims 3b|7b|32b),
random bf16 weights built directly on the GPU, and all methods run in one process; peak memory
is the growth of torch's peak allocated GPU memory during one generation over what was
allocated before it (the weights). Out of memory is recorded as such.

Time is the median of --repeats generations after one warm run (one warm round on the CPU). Every run also prints the
capture's extra aten operations per decoder layer per decode step (counted with torch.profiler
on a tiny model) and what the two stores would keep at the 7B and 32B shapes.

    python bench/bench_capture.py                        # CPU defaults, about 10 minutes on 2 cores
    python bench/bench_capture.py --sizes 448 --new-tokens 8 --repeats 1     # a quick look
    python bench/bench_capture.py --device cuda --dims 7b                     # on a GPU
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
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
METHODS = ("plain", "ours", "eager")
# Text dimensions of the public Qwen2.5-VL checkpoints (their vision tower is the same for all three).
PUBLIC_DIMS = {
    "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, vocab=151936),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064),
    "32b": dict(hidden=5120, layers=64, heads=40, kv_heads=8, intermediate=27648, vocab=152064),
}
# InternVL3-8B: a Qwen2.5-7B decoder behind InternViT-300M, 448 px tiles of 256 tokens, up to 12 tiles + thumbnail.
INTERNVL_DIMS = {
    "internvl-8b": dict(
        hidden=3584,
        layers=28,
        heads=28,
        kv_heads=4,
        intermediate=18944,
        vocab=151674,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
    )
}


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _image(side: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(side)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _once(holder, method: str, image, prompt: str, new_tokens: int) -> int:
    """One generation; returns the bytes of attention it keeps."""
    import torch

    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        if method == "ours":
            return holder.generate(image, prompt, **fixed).nbytes
        inputs = holder.on_model(holder.build_inputs(image, prompt))  # every method pays for preprocessing
        holder.model.set_attn_implementation({"text_config": "eager" if method == "eager" else "sdpa"})
        try:
            out = holder.model.generate(
                **inputs, **fixed, output_attentions=method == "eager", return_dict_in_generate=True
            )
        finally:
            holder.model.set_attn_implementation({"text_config": "sdpa"})
        return sum(a.numel() * a.element_size() for step in out.attentions for a in step) if method == "eager" else 0


def cpu_worker(model_dir: str, method: str, side: int, new_tokens: int, repeats: int) -> dict:
    """In this fresh process: the peak memory of one run of `method`, or with method 'time' the
    median time of every method, run in turns (plain, ours, eager, plain, ...) after one warm round."""
    from model_holder import ModelHolder

    holder = ModelHolder.load(model_dir, device="cpu", dtype="float32")
    image, prompt = _image(side), "Describe the image."
    prompt_len = holder.build_inputs(image, prompt)["input_ids"].shape[1]
    if method != "time":
        rss_before = _rss_kb()
        stored = _once(holder, method, image, prompt, new_tokens)
        peak_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        return {"method": method, "peak_mb": peak_growth_mb, "stored_mb": stored / 2**20}
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for round_idx in range(repeats + 1):
        for name in METHODS[round_idx % 3 :] + METHODS[: round_idx % 3]:  # each goes first once in 3 rounds
            start = time.perf_counter()
            _once(holder, name, image, prompt, new_tokens)
            if round_idx:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {"side": side, "prompt_tokens": prompt_len, "seconds": {k: statistics.median(v) for k, v in times.items()}}


def cpu_rows(model_dir: str, side: int, args) -> dict[str, dict]:
    """Peak memory of each method (median over --peak-runs fresh processes), and their times side by side
    in one more process."""
    timing = _run_cpu_worker(model_dir, "time", side, args)
    rows = {}
    for method in METHODS:
        peaks = [_run_cpu_worker(model_dir, method, side, args) for _ in range(args.peak_runs)]
        rows[method] = dict(
            peaks[0],
            peak_mb=statistics.median(p["peak_mb"] for p in peaks),
            side=side,
            prompt_tokens=timing["prompt_tokens"],
            seconds=timing["seconds"][method],
        )
    return rows


def _run_cpu_worker(model_dir: str, method: str, side: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        model_dir,
        method,
        str(side),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def public_holder(dims_name: str, device: str, max_side: int):
    """A ModelHolder over random bf16 weights at a public Qwen2.5-VL config's dimensions, built on `device`."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    from model_holder import ModelHolder
    from testing.tiny_models import _qwen_ids, _qwen_tokenizer, build_processor

    dims, tok = PUBLIC_DIMS[dims_name], _qwen_tokenizer()
    text = dict(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=dims["hidden"],
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    processor = build_processor("qwen2_5_vl", tok, max_pixels=max_side**2 + 28 * 28)
    return ModelHolder(model, processor, "qwen2_5_vl", f"random Qwen2.5-VL {dims_name} dims", device, torch.bfloat16)


def public_internvl_holder(dims_name: str, device: str, **shrink):
    """A ModelHolder over random bf16 weights at InternVL3-8B's dimensions (`shrink` overrides them, for a
    quick check on the CPU), with the real processor: 448 px tiles, pixel shuffle to 256 tokens, a thumbnail."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    from model_holder import ModelHolder
    from testing import tiny_tiles
    from testing.tiny_models import _tokenizer

    dims, tok = {**INTERNVL_DIMS[dims_name], **shrink}, tiny_tiles.tokenizer_for("internvl", _tokenizer)
    text = dict(
        model_type="qwen2",
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=dims["vision_hidden"],
        intermediate_size=4 * dims["vision_hidden"],
        num_hidden_layers=dims["vision_layers"],
        num_attention_heads=dims["vision_heads"],
        image_size=[448, 448],
        patch_size=[14, 14],
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        downsample_ratio=0.5,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    image_proc = GotOcr2ImageProcessor(
        size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12
    )
    processor = InternVLProcessor(
        image_processor=image_proc,
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=256,
        chat_template=tiny_tiles.QWEN_STYLE_TEMPLATE,
    )
    return ModelHolder(model, processor, "internvl", f"random InternVL {dims_name} dims", device, torch.bfloat16)


def gpu_rows(holder, side: int, new_tokens: int, repeats: int) -> list[dict]:
    """All three methods at one size on the GPU, in this process."""
    import torch

    image, prompt = _image(side), "Describe the image."
    prompt_len = holder.build_inputs(image, prompt)["input_ids"].shape[1]
    rows = []
    for method in METHODS:
        row = {"method": method, "side": side, "prompt_tokens": prompt_len, "new_tokens": new_tokens}
        try:
            _once(holder, method, image, prompt, new_tokens)  # warm
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            stored = _once(holder, method, image, prompt, new_tokens)
            torch.cuda.synchronize()
            row["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                _once(holder, method, image, prompt, new_tokens)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            row.update(seconds=statistics.median(times), stored_mb=stored / 2**20)
        except torch.OutOfMemoryError:
            row["oom"] = True
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def print_table(results: dict[str, dict]) -> None:
    base = results["plain"]
    for method in METHODS:
        r = results[method]
        if r.get("oom"):
            print(f"| {r['side']}² | {r['prompt_tokens']} | {method} | out of memory | | | | |", flush=True)
            continue
        print(
            f"| {r['side']}² | {r['prompt_tokens']} | {method} | {r['seconds']:.3f} | "
            f"{r['seconds'] / base['seconds']:.2f}× | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / max(base['peak_mb'], 1):.2f}× | {r['stored_mb']:.1f} |",
            flush=True,
        )


def decode_loop_ops() -> float:
    """Extra aten operations the capture adds per decoder layer per decode step, on a tiny model."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from attention_extractor import capture_attention
    from model_holder import ModelHolder
    from testing.tiny_models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        holder = ModelHolder.load(make_tiny_model("qwen2_5_vl", tmp), device="cpu", dtype="float32")
    inputs = holder.on_model(holder.build_inputs(_image(112), "Describe the image."))

    def ops(new_tokens: int, capture: bool) -> int:
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        with torch.inference_mode():
            with capture_attention(holder.model) if capture else nullcontext():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    holder.model.generate(**inputs, **kwargs)
        return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))

    extra = (ops(9, True) - ops(5, True)) - (ops(9, False) - ops(5, False))
    return extra / (4 * holder.num_layers)


def print_store_sizes(prompt_len: int = 1315, steps: tuple[int, ...] = (64, 256)) -> None:
    """Bytes each store keeps at the public 7B and 32B shapes (bf16), from the dimensions."""
    from attention_store import store_bytes

    print(
        f"\n# Attention kept per run at public shapes, {prompt_len} prompt tokens (1008²), bf16, from the dimensions:"
    )
    print("| dims | new tokens | float16 rows | queries + keys | kept (auto) |")
    print("|---|---|---|---|---|")
    for name in ("7b", "32b"):
        d = PUBLIC_DIMS[name]
        for num_steps in steps:
            dims = dict(
                num_layers=d["layers"],
                num_heads=d["heads"],
                num_kv_heads=d["kv_heads"],
                head_dim=128,
                prompt_len=prompt_len,
                num_steps=num_steps,
                num_prompt_rows=0,
                itemsize=2,
            )
            rows, qk = store_bytes("rows", **dims) / 2**20, store_bytes("qk", **dims) / 2**20
            print(
                f"| {name} | {num_steps} | {rows:.0f} MB | {qk:.0f} MB | {min(rows, qk):.0f} MB "
                f"({rows / qk:.1f}× smaller than rows) |"
                if qk < rows
                else f"| {name} | {num_steps} | {rows:.0f} MB | {qk:.0f} MB | {rows:.0f} MB |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description="Capture overhead against plain SDPA and eager attention.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dims",
        choices=sorted(PUBLIC_DIMS) + sorted(INTERNVL_DIMS),
        default="7b",
        help="public dimensions (cuda only): Qwen2.5-VL 3b/7b/32b, or InternVL3-8B",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        help="square image sides, px (default 448 728 1008 on the CPU; 448 1008 2016 3024 on cuda)",
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="default 32 on the CPU, 64 on cuda")
    parser.add_argument("--long", type=int, default=256, help="cuda: new tokens of the long-answer row at 1008²")
    parser.add_argument("--repeats", type=int, default=None, help="default 2 on the CPU, 3 on cuda")
    parser.add_argument("--peak-runs", type=int, default=3, help="CPU: fresh processes per method for the peak")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vision-dim", type=int, default=128)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "METHOD", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.new_tokens = args.new_tokens or (64 if cuda else 32)
    args.repeats = args.repeats or (3 if cuda else 2)
    args.sizes = args.sizes or ([448, 1008, 2016, 3024] if cuda else [448, 728, 1008])
    if args.worker:
        print(
            json.dumps(cpu_worker(args.worker[0], args.worker[1], int(args.worker[2]), args.new_tokens, args.repeats))
        )
        return

    import torch

    print(f"# capture adds {decode_loop_ops():.1f} aten ops per decoder layer per decode step (tiny model, CPU)")
    print(f"# torch {torch.__version__}; {platform.processor() or platform.machine()}, {platform.system()}")
    header = (
        "| image | prompt tokens | method | time s | time × plain | peak MB | peak × plain | kept MB |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    if cuda:
        holder = (
            public_internvl_holder(args.dims, "cuda")
            if args.dims in INTERNVL_DIMS
            else public_holder(args.dims, "cuda", max(args.sizes + [1008]))
        )
        print(
            f"# {torch.cuda.get_device_name()}; {holder.model_id}, random bf16 weights; "
            f"{args.new_tokens} new tokens; median of {args.repeats}"
        )
        print(header)
        for side in args.sizes:
            print_table({r["method"]: r for r in gpu_rows(holder, side, args.new_tokens, args.repeats)})
        if args.long:
            print(f"# long answer: {args.long} new tokens")
            print_table({r["method"]: r for r in gpu_rows(holder, 1008, args.long, args.repeats)})
    else:
        from testing.tiny_models import make_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            make_tiny_model(
                "qwen2_5_vl",
                tmp,
                sharpen=1.0,
                max_pixels=max(args.sizes) ** 2 + 28 * 28,
                hidden=args.hidden,
                layers=args.layers,
                heads=args.heads,
                kv_heads=args.kv_heads,
                vision_dim=args.vision_dim,
                vision_depth=args.vision_depth,
                intermediate=int(args.hidden * 5.4),
            )
            print(
                f"# Qwen2.5-VL, random weights: text hidden {args.hidden}, {args.layers} layers, {args.heads} "
                f"heads ({args.kv_heads} KV), vision dim {args.vision_dim} x {args.vision_depth}; "
                f"{args.new_tokens} new tokens; median of {args.repeats}"
            )
            print(header)
            for side in args.sizes:
                print_table(cpu_rows(tmp, side, args))
    print_store_sizes()


if __name__ == "__main__":
    main()
