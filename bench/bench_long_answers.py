"""Where a long answer's capture time goes: per decode step, and after generation.

A random-weight Qwen2.5-VL (real proportions, small; every dimension a flag) generates --tokens new
tokens (default 256 and 1024) plain and with the capture, alternating, after a warm run of each. For
each it prints:

- the median decode step in the first and in the last quarter of the answer, plain and captured:
  if the capture's bookkeeping grew with the answer (list growth, references kept, Python work per
  layer), the last quarter's extra would exceed the first's;
- the time of `finish` (the rows' rebuild, the segment masses and the copies to the host) and of
  the whole generation, as a share of plain generation.

    python bench/bench_long_answers.py                   # about 3 minutes on 2 cores
    python bench/bench_long_answers.py --tokens 256 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

import attention_extractor  # noqa: E402
from model_holder import ModelHolder  # noqa: E402
from testing.tiny_models import make_tiny_model  # noqa: E402


class StepClock(StoppingCriteria):
    """Records the time at every decode step (transformers asks the stopping criteria once per token)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def quarter_medians(stamps: list[float]) -> tuple[float, float]:
    """(median step of the first quarter, of the last quarter), ms; the prefill is left out."""
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    quarter = max(1, len(steps) // 4)
    return statistics.median(steps[:quarter]) * 1000, statistics.median(steps[-quarter:]) * 1000


def one(holder, image, tokens: int, captured: bool) -> dict:
    clock = StepClock()
    fixed = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    finish = {"s": 0.0}
    original = attention_extractor.GenerationRecorder.finish

    def timed_finish(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            finish["s"] = time.perf_counter() - start

    start = time.perf_counter()
    if captured:
        attention_extractor.GenerationRecorder.finish = timed_finish
        try:
            holder.generate(image, "Describe the image.", stopping_criteria=StoppingCriteriaList([clock]), **fixed)
        finally:
            attention_extractor.GenerationRecorder.finish = original
    else:
        inputs = holder.on_model(holder.build_inputs(image, "Describe the image."))
        with torch.inference_mode():
            holder.model.generate(**inputs, stopping_criteria=StoppingCriteriaList([clock]), **fixed)
    total = time.perf_counter() - start
    first, last = quarter_medians(clock.stamps)
    return {"total_s": total, "first_ms": first, "last_ms": last, "finish_s": finish["s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--side", type=int, default=448)
    args = parser.parse_args()
    from PIL import Image

    image = Image.new("RGB", (args.side, args.side), (120, 80, 40))
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_model(
            "qwen2_5_vl",
            tmp,
            sharpen=1.0,
            max_pixels=args.side**2 + 28 * 28,
            hidden=args.hidden,
            layers=args.layers,
            heads=8,
            kv_heads=2,
            intermediate=int(args.hidden * 5.4),
        )
        holder = ModelHolder.load(tmp, device="cpu", dtype="float32")
    print(
        f"# Qwen2.5-VL, random weights: hidden {args.hidden}, {args.layers} layers, 8 heads (2 KV), {args.side}² "
        f"image; CPU, torch threads {torch.get_num_threads()}; median of {args.repeats} after a warm run each"
    )
    print("| new tokens | method | total s | × plain | step ms, first quarter | last quarter | finish s |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        for captured in (False, True):
            one(holder, image, min(tokens, 32), captured)  # warm
        rows: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(args.repeats):
            for captured in (False, True) if r % 2 == 0 else (True, False):
                rows[captured].append(one(holder, image, tokens, captured))
        med = {c: {k: statistics.median(row[k] for row in rows[c]) for k in rows[c][0]} for c in rows}
        for captured, name in ((False, "plain"), (True, "captured")):
            m = med[captured]
            print(
                f"| {tokens} | {name} | {m['total_s']:.2f} | {m['total_s'] / med[False]['total_s']:.3f}× | "
                f"{m['first_ms']:.2f} | {m['last_ms']:.2f} | {m['finish_s']:.3f} |"
            )
        extra_first = med[True]["first_ms"] - med[False]["first_ms"]
        extra_last = med[True]["last_ms"] - med[False]["last_ms"]
        print(
            f"# {tokens} tokens: the capture adds {extra_first:+.2f} ms per step early and {extra_last:+.2f} ms late; "
            f"finish is {med[True]['finish_s'] / med[False]['total_s']:.1%} of plain generation"
        )


if __name__ == "__main__":
    main()
