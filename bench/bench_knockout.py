"""Knockout benchmark for the demo model: does blocking attention to the object's box change the answer?

On held-out `demo_data` scenes (the localization benchmark's test seed), each scene's answer is generated
with its question and the answer token the localization benchmark scores (step 0) is replayed,
teacher-forced, with attention edges blocked (`causal`). Per window of decoder layers
(`ModelHolder.knockout_sweep`) it reports the mean relative change of the answer's probability,
(p_after - p_before) / p_before, when the box's image tokens are blocked from the answer's query
(box -> token), when random regions of the box's size away from it are (the control: mean of the draws,
and the 10th-90th percentile of the per-scene control means), and when the whole image or the box is
blocked from the question's words (image -> question, box -> question). Then over all layers at once:
the box blocked from the token (`ModelHolder.knockout`) against the mean of the same random regions
(`causal.sweep.knockout_with_control`), with a paired one-sided sign test that the box's change is the
more negative one (`metrics.sign_test`). CPU, float32; a few minutes at the defaults on 2 cores.

    nice -n 15 python bench/bench_knockout.py [--scenes 40] [--draws 8] [--window N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_localization import TEST_SEED, Item, run_items  # noqa: E402
from causal.positions import box_positions  # noqa: E402
from causal.sweep import KnockoutSweep, control_positions, knockout_with_control  # noqa: E402
from config import DEMO_MODEL_DIR  # noqa: E402
from metrics import sign_test  # noqa: E402
from model_holder import ModelHolder  # noqa: E402

STEP = 0  # the answer word, the token bench_localization.py scores


@dataclass
class SceneResult:
    """One scene's sweep and its all-layers figures (relative changes of the answer's probability)."""

    item: Item
    sweep: KnockoutSweep
    box_all: float  # the box blocked from the token in every layer
    box_flips: bool  # whether that knockout makes another token the likeliest
    control_all: float  # the mean over the control regions, blocked the same way


def default_window(num_layers: int) -> int:
    """The layer count rounded down to an odd number, at most 9 (3 for the 4-layer demo model)."""
    odd = num_layers if num_layers % 2 else num_layers - 1
    return max(1, min(9, odd))


def machine() -> str:
    """CPU model name (from /proc/cpuinfo where there is one) and core count."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores visible, {platform.system()}"


def commit() -> str:
    """The short commit, marked when the working tree has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


def measure(holder, item: Item, window: int, draws: int, seed: int, batch_size: int) -> SceneResult:
    """The sweep and the all-layers box / control knockouts of one scene's answer token."""
    run, box = item.run, item.sample.box_xyxy
    sweep = holder.knockout_sweep(run, STEP, box, window=window, draws=draws, seed=seed, batch_size=batch_size)
    found = holder.knockout(run, STEP, box=box)
    controls = control_positions(holder, run, box, draws, seed)
    _, control = knockout_with_control(
        holder, run, STEP, box_positions(run, box), controls=controls, batch_size=batch_size
    )  # (draws,)
    flips = found.top_after[0][0].strip() != found.token.strip()
    return SceneResult(item, sweep, float(found.relative_change), flips, float(control.mean()))


def fmt(value: float) -> str:
    """A signed change to 3 decimals, without a "-0.000" for changes that round to nothing."""
    return f"{round(float(value), 3) + 0.0:+.3f}"


def sign(first, second) -> str:
    wins, pairs, p = sign_test(first, second)
    return f"{wins}/{pairs}, p = {p:.2g}"


def report(results: list[SceneResult], num_layers: int, window: int, draws: int, seed: int = TEST_SEED) -> str:
    sweeps = [r.sweep for r in results]
    box = np.stack([s.changes["box_token"] for s in sweeps])  # (scenes, n)
    box_q = np.stack([s.changes["box_question"] for s in sweeps])
    image_q = np.stack([s.changes["image_question"] for s in sweeps])
    control = np.stack([s.control_mean() for s in sweeps])  # (scenes, n): each scene's mean over its draws
    spans = sweeps[0].windows
    correct = sum(r.item.correct for r in results)
    lines = [
        "## Demo model knockout benchmark",
        "",
        f"scene seed {seed}{' (the localization test seed)' if seed == TEST_SEED else ''}, {len(results)} scenes "
        f"({correct} answered correctly), answer token (step {STEP}); "
        f"mean p(answer) before {np.mean([s.p_before for s in sweeps]):.3f}",
        f"window {window} of {num_layers} decoder layers (0-based inclusive, clipped at the ends); "
        f"{draws} control regions per scene; box {np.mean([s.box_tokens for s in sweeps]):.1f} image tokens, "
        f"control regions {np.mean([s.control_tokens.mean() for s in sweeps]):.1f} on average",
        "mean relative change of p(answer), (p_after - p_before) / p_before; -1 = the answer is gone",
        "",
        "| layers | box → token | control → token (mean) | control P10–P90 | box < control (sign test) "
        "| image → question | box → question |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (lo, hi) in enumerate(spans):
        p10, p90 = np.percentile(control[:, i], [10, 90])
        lines.append(
            f"| {lo}–{hi} | {fmt(box[:, i].mean())} | {fmt(control[:, i].mean())} | {fmt(p10)} … {fmt(p90)} "
            f"| {sign(box[:, i], control[:, i])} | {fmt(image_q[:, i].mean())} | {fmt(box_q[:, i].mean())} |"
        )
    box_all = np.array([r.box_all for r in results])
    control_all = np.array([r.control_all for r in results])
    p10, p90 = np.percentile(control_all, [10, 90])
    lines += [
        "",
        f"all layers 0–{num_layers - 1}: box → token {fmt(box_all.mean())} (median {fmt(np.median(box_all))}; "
        f"another token becomes the likeliest in {sum(r.box_flips for r in results)}/{len(results)} scenes) "
        f"vs random control {fmt(control_all.mean())} (P10–P90 {fmt(p10)} … {fmt(p90)}); "
        f"box < control in {sign(box_all, control_all)} (paired one-sided sign test)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--scenes", type=int, default=40, help="held-out scenes (test seed)")
    p.add_argument("--seed", type=int, default=TEST_SEED, help="scene seed (default: the localization test seed)")
    p.add_argument("--window", type=int, default=None, help="layers per window (default: layer count, odd, ≤ 9)")
    p.add_argument("--draws", type=int, default=8, help="random control regions per scene")
    p.add_argument("--batch-size", type=int, default=8, help="knockouts per forward")
    args = p.parse_args(argv)
    start = time.perf_counter()
    holder = ModelHolder.load(args.model, device="cpu", dtype="float32")
    num_layers = holder.num_layers
    window = args.window or default_window(num_layers)
    print(f"window: {window} layers ({num_layers} decoder layers)", flush=True)
    items = run_items(holder, args.seed, args.scenes)
    results = [measure(holder, it, window, args.draws, k, args.batch_size) for k, it in enumerate(items)]
    text = report(results, num_layers, window, args.draws, args.seed)
    wall = time.perf_counter() - start
    text += (
        f"\n\nmachine: {machine()}; date {datetime.date.today().isoformat()}; commit {commit()}; "
        f"{len(results)} scenes; wall time {wall:.1f} s"
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
