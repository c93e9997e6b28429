"""Every GPU figure the README quotes, from one command: the capture against plain generation, token
switches and the animation on the runs' own stores, and the CUDA tests.

On a GPU (random bf16 weights at the public Qwen2.5-VL 7B and 32B dimensions, built on the card):

  capture   7B at 448², 1008², 3024² with 64 and 256 new tokens; 32B at 1008² and 2016² with 64.
            Plain generate and ours (ModelHolder.generate, the store kept on the GPU when it fits)
            alternate, each run once to warm up, then the median of --repeats (at least 3). GPU peak is
            the growth of torch's peak allocated memory during one generation over what was allocated
            before it; the store is made inside the call, so it is counted.
  switch    on a 64-token run of each size: a token switch (first, the next token after a pause in which
            the idle prefetch runs, a token viewed already, a jump), every token's map in one pass, and
            the 64-frame animation (`bench_render.switch_timings`).
  tests     tests/test_gpu.py, its summary line.

It writes one JSON file (after every case, so a run cut short keeps what it measured) and prints the
README's tables. --cpu-check runs the same suite on the CPU at scaled-down dimensions, so CI proves it
works; its numbers say nothing about a GPU.

    python bench/gpu_suite.py --out gpu_suite.json           # on a GPU: about 6 minutes on one H100/H200
    python bench/gpu_suite.py --cpu-check --out /tmp/s.json  # the CI run, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GPU_PLAN = {  # dims -> [(image side, new tokens)]
    "7b": [(448, 64), (1008, 64), (3024, 64), (448, 256), (1008, 256), (3024, 256)],
    "32b": [(1008, 64), (2016, 64)],
}
CPU_PLAN = {"tiny": [(112, 8), (224, 8), (112, 16)]}
SWITCH_TOKENS = {"gpu": 64, "cpu": 8}  # the token count of the runs whose switches are timed


def _holder(dims: str, device: str, max_side: int):
    """The model: public dimensions on a GPU; on the CPU a scaled-down Qwen2.5-VL saved and reloaded."""
    if device == "cuda":
        from bench_capture import public_holder

        return public_holder(dims, "cuda", max_side)
    from model_holder import ModelHolder
    from testing.tiny_models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model("qwen2_5_vl", tmp, max_pixels=max_side**2 + 28 * 28, hidden=64, layers=2, heads=4, kv_heads=2)
        return ModelHolder.load(tmp, device="cpu", dtype="float32")


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _measure(holder, method: str, image, tokens: int, device: str) -> tuple[float, float | None]:
    """(seconds, GPU peak growth in MB or None on the CPU) of one generation."""
    import torch
    from bench_capture import _once

    _sync(device)
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _once(holder, method, image, "Describe the image.", tokens)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" else None
    gc.collect()  # the run and its store go before the next one
    return seconds, peak


def capture_case(holder, side: int, tokens: int, device: str, repeats: int) -> dict:
    """Plain and ours at one size, alternating which goes first, after one warm run of each."""
    from bench_capture import _image

    image = _image(side)
    prompt_len = holder.build_inputs(image, "Describe the image.")["input_ids"].shape[1]
    for method in ("plain", "ours"):
        _measure(holder, method, image, tokens, device)
    seconds: dict[str, list[float]] = {"plain": [], "ours": []}
    peaks: dict[str, list[float]] = {"plain": [], "ours": []}
    for r in range(repeats):
        for method in ("plain", "ours") if r % 2 == 0 else ("ours", "plain"):
            took, peak = _measure(holder, method, image, tokens, device)
            seconds[method].append(took)
            if peak is not None:
                peaks[method].append(peak)
    row = {"side": side, "tokens": tokens, "prompt_tokens": prompt_len, "runs": repeats}
    for method in ("plain", "ours"):
        row[f"{method}_s"] = statistics.median(seconds[method])
        row[f"{method}_peak_mb"] = statistics.median(peaks[method]) if peaks[method] else None
    row["time_ratio"] = row["ours_s"] / row["plain_s"]
    if row["plain_peak_mb"]:
        row["peak_ratio"] = row["ours_peak_mb"] / row["plain_peak_mb"]
    return row


def switch_case(holder, side: int, tokens: int, device: str, pause_s: float) -> dict:
    """Token switches on the query-key store of one real generation (the store whose rows are computed per
    view; 'auto' picks it at these dimensions), kept where `ModelHolder.generate` put it."""
    from bench_capture import _image
    from bench_render import switch_timings

    image = _image(side)
    run = holder.generate(image, "Describe the image.", max_new_tokens=tokens, min_new_tokens=tokens, store="qk")
    return {"side": side, **switch_timings(run, image, device, repeats=3, pause_s=pause_s)}


def gpu_tests(device: str) -> dict:
    """tests/test_gpu.py's summary line and exit code."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {
        "returncode": proc.returncode,
        "summary": lines[-1] if lines else "",
        "seconds": time.perf_counter() - started,
    }


def print_tables(result: dict) -> None:
    print(f"\n# {result['machine']}; torch {result['torch']}, transformers {result['transformers']}; {result['date']}")
    print(
        "| dims | image | prompt tokens | new tokens | plain s | ours s | time × plain "
        "| GPU peak plain MB | ours MB | peak × plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in result["capture"]:
        peak = (
            f"{row['plain_peak_mb']:.0f} | {row['ours_peak_mb']:.0f} | {row['peak_ratio']:.2f}×"
            if row.get("peak_ratio")
            else "— | — | —"
        )
        print(
            f"| {row['dims']} | {row['side']}² | {row['prompt_tokens']} | {row['tokens']} | {row['plain_s']:.3f} | "
            f"{row['ours_s']:.3f} | {row['time_ratio']:.2f}× | {peak} |"
        )
    print("\n| dims | image | store | first ms | next ms | cached ms | jump ms | all tokens' maps ms | animation s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["switch"]:
        print(
            f"| {row['dims']} | {row['side']}² | {row['placement']} | {row['first_ms']:.1f} | {row['next_ms']:.1f} | "
            f"{row['cached_ms']:.1f} | {row['jump_ms']:.1f} | {row['maps_all_tokens_ms']:.0f} | "
            f"{row['animation_ms'] / 1000:.2f} |"
        )
    tests = result.get("tests")
    if tests:
        print(f"\ntests/test_gpu.py: {tests['summary']} (exit {tests['returncode']})")
    print(f"suite: {result['seconds']:.0f} s")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-check", action="store_true", help="scaled-down dimensions on the CPU (CI)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "gpu_suite.json"), help="the JSON written")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method after the warm one")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip the cases left after this long")
    parser.add_argument("--pause-s", type=float, default=0.5, help="reading pause before the next token")
    parser.add_argument("--no-tests", action="store_true", help="leave out tests/test_gpu.py")
    args = parser.parse_args(argv)
    import torch
    import transformers

    device = "cpu" if args.cpu_check else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; run with --cpu-check for the scaled-down CPU run")
    plan = CPU_PLAN if args.cpu_check else GPU_PLAN
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()}), scaled-down dims"
    started = time.perf_counter()
    result = {
        "machine": machine,
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "capture": [],
        "switch": [],
        "skipped": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(result, indent=1))

    switch_tokens = SWITCH_TOKENS["cpu" if args.cpu_check else "gpu"]
    for dims, cases in plan.items():
        holder = _holder(dims, device, max(side for side, _ in cases))
        for side, tokens in cases:
            if time.perf_counter() - started > args.budget_s:
                result["skipped"].append(f"{dims} {side}² {tokens} tokens: past the {args.budget_s:.0f} s budget")
                continue
            try:
                result["capture"].append({"dims": dims, **capture_case(holder, side, tokens, device, args.repeats)})
                if tokens == switch_tokens:
                    result["switch"].append({"dims": dims, **switch_case(holder, side, tokens, device, args.pause_s)})
            except torch.OutOfMemoryError:
                result["skipped"].append(f"{dims} {side}² {tokens} tokens: out of GPU memory")
                torch.cuda.empty_cache()
            print(json.dumps(result["capture"][-1]) if result["capture"] else "", flush=True)
            save()
        del holder
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if not args.no_tests:
        result["tests"] = gpu_tests(device)
    save()
    print_tables(result)
    for line in result["skipped"]:
        print(f"skipped: {line}")
    return result


if __name__ == "__main__":
    main()
