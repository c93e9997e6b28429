"""Deletion and insertion AUCs of the demo model's answer-token maps against random cell orders.

On held-out synthetic images (the localization benchmark's test seed), each answer token's map at
the recommended layers and heads ranks the token cells; the cells are blurred away (deletion) or
restored into a blurred image (insertion) in that order and in a seeded random order, and the
answer's probability is read after each step. Prints the mean AUCs and the ratio map / random.

    python bench/bench_faithfulness.py [--n 30] [--steps 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attention_processor import token_heatmap  # noqa: E402
from config import DEMO_MODEL_DIR, DEMO_RANGES  # noqa: E402
from demo import data as demo_data  # noqa: E402
from methods.faithfulness import faithfulness  # noqa: E402
from model_holder import ModelHolder  # noqa: E402

TEST_SEED = 31_337  # the localization benchmark's held-out test seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    holder = ModelHolder.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    layers, heads = DEMO_RANGES
    totals: dict[str, list[float]] = {}
    for seed_offset, sample in enumerate(demo_data.make_samples(TEST_SEED, args.n)):
        run = holder.generate(sample.image, sample.question, max_new_tokens=1)
        heat = token_heatmap(run, 0, layers, heads, "mean")
        result = faithfulness(holder, run, 0, heat, steps=args.steps, seed=seed_offset)
        for name, value in result.summary().items():
            totals.setdefault(name, []).append(value)
    mean = {name: float(np.mean(values)) for name, values in totals.items()}
    print(f"# demo model, layers {layers}, heads {heads}, mean; n={args.n} test images, {args.steps} steps")
    print("| curve | map order | random order | map / random |")
    print("|---|---|---|---|")
    for kind, better in (("deletion", "lower is better"), ("insertion", "higher is better")):
        print(
            f"| {kind} AUC ({better}) | {mean[kind]:.3f} | {mean['random_' + kind]:.3f} | "
            f"{mean[kind] / mean['random_' + kind]:.2f}× |"
        )


if __name__ == "__main__":
    main()
