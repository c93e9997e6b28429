"""Localization benchmark for the demo model: does the answer token's attention point at the object?

For held-out `demo_data` images it measures answer accuracy and the pointing game: the argmax cell
of the answer token's heatmap (step 0), mapped to the cell centre in image pixels, must fall inside
the box of the object the answer is about. The layer and head ranges are chosen on a validation
seed and reported on a separate test seed, next to a shuffled-grid control whose expected value is
the share of cells whose centre lies in the box (chance).

    nice -n 15 python bench/bench_localization.py --model demo_model --n 200
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_processor import token_heatmap, vision_attention  # noqa: E402
from demo import data as demo_data  # noqa: E402
from methods import METHODS, MapRequest, compute_maps  # noqa: E402
from methods.faithfulness import faithfulness  # noqa: E402
from model_holder import ModelHolder  # noqa: E402
from records import cell_edges  # noqa: E402
from study import localization  # noqa: E402
from study.localization import RangeChoice, contiguous_ranges, range_hits, ranges_json, ranges_record  # noqa: E402

log = logging.getLogger("bench_localization")
REDUCES = ("mean", "max", "min")
VALIDATION_SEED, TEST_SEED = 20_241, 31_337  # training uses string seeds, so neither was trained on


@dataclass
class Item:
    """One generated answer and everything needed to score its heatmaps."""

    sample: demo_data.Sample
    run: object  # the engine's generation result
    correct: bool


def argmax_cell_xyxy(heat: np.ndarray, image_box_xyxy) -> tuple[float, float, float, float]:
    """The rectangle, in image pixels, of heat's argmax cell (heat: (grid_h, grid_w))."""
    row, col = divmod(int(np.argmax(heat)), heat.shape[1])
    xs, ys = cell_edges(heat.shape, image_box_xyxy)  # (grid_w + 1,), (grid_h + 1,)
    return float(xs[col]), float(ys[row]), float(xs[col + 1]), float(ys[row + 1])


def cell_hits_box(heat: np.ndarray, image_box_xyxy, target_box_xyxy) -> bool:
    """True if the centre of heat's argmax cell (heat: (grid_h, grid_w)) lies in the target box."""
    cx0, cy0, cx1, cy1 = argmax_cell_xyxy(heat, image_box_xyxy)
    cx, cy = (cx0 + cx1) / 2, (cy0 + cy1) / 2
    tx0, ty0, tx1, ty1 = target_box_xyxy
    return tx0 <= cx < tx1 and ty0 <= cy < ty1


def cell_touches_box(heat: np.ndarray, image_box_xyxy, target_box_xyxy) -> bool:
    """Looser diagnostic: the argmax cell's rectangle overlaps the target box at all."""
    cx0, cy0, cx1, cy1 = argmax_cell_xyxy(heat, image_box_xyxy)
    tx0, ty0, tx1, ty1 = target_box_xyxy
    return cx0 < tx1 and tx0 < cx1 and cy0 < ty1 and ty0 < cy1


def chance(grid_hw, image_box_xyxy, target_box_xyxy) -> float:
    """Share of cells whose centre is in the target box = expected hit rate of a random cell."""
    grid_h, grid_w = grid_hw
    hits = [
        cell_hits_box(np.eye(grid_h * grid_w)[i].reshape(grid_h, grid_w), image_box_xyxy, target_box_xyxy)
        for i in range(grid_h * grid_w)
    ]
    return float(np.mean(hits))


def run_items(holder, seed: int, n: int) -> list[Item]:
    items = []
    for sample in demo_data.make_samples(seed, n):
        run = holder.generate(sample.image, sample.question, max_new_tokens=2)
        answer = str(run.generated_tokens[0]).strip().lower()
        items.append(Item(sample, run, answer == sample.answer))
    return items


def pointing(
    items: list[Item],
    layers,
    heads,
    reduce: str,
    shuffle_seed: int | None = None,
    any_object: bool = False,
    touch: bool = False,
) -> float:
    """Pointing-game hit rate; with shuffle_seed, the heatmap cells are permuted first (control).
    any_object: count a hit on any object's box (a diagnostic: "looked at an object, not the right one").
    touch: count a hit when the argmax cell merely overlaps the box (a diagnostic: "next to it")."""
    rng = np.random.default_rng(shuffle_seed)
    hits = []
    for it in items:
        heat = token_heatmap(it.run, 0, layers=layers, heads=heads, reduce=reduce)  # (grid_h, grid_w)
        if shuffle_seed is not None:
            heat = rng.permutation(heat.reshape(-1)).reshape(heat.shape)
        boxes = [o.box_xyxy for o in it.sample.objects] if any_object else [it.sample.box_xyxy]
        hit = cell_touches_box if touch else cell_hits_box
        hits.append(any(hit(heat, it.run.vision.image_box_xyxy, box) for box in boxes))
    return float(np.mean(hits))


def item_range_hits(it: Item) -> np.ndarray:
    """(n_layer_ranges, n_head_ranges) bool: whether each pair of ranges' mean map of the answer token
    points into the target box (this benchmark's rule, `cell_hits_box`, for every cell)."""
    grid_h, grid_w = it.run.vision.grid_hw
    cell_hit = np.array(
        [
            cell_hits_box(
                np.eye(grid_h * grid_w)[j].reshape(grid_h, grid_w), it.run.vision.image_box_xyxy, it.sample.box_xyxy
            )
            for j in range(grid_h * grid_w)
        ]
    )  # (N,)
    return range_hits(vision_attention(it.run, 0).numpy(), cell_hit)  # (L, H, N) in


def choose_ranges(items: list[Item], n_layers: int, n_heads: int) -> RangeChoice:
    """Best (layers, heads) by mean-pointing on the validation items (`localization.choose_ranges`)."""
    return localization.choose_ranges(
        np.stack([item_range_hits(it) for it in items]),
        contiguous_ranges(range(n_layers)),
        contiguous_ranges(range(n_heads)),
    )


def accuracy(items: list[Item]) -> dict[str, float]:
    out = {
        q: float(np.mean([it.correct for it in items if it.sample.question_type == q]))
        for q in demo_data.QUESTION_TYPES
        if any(it.sample.question_type == q for it in items)
    }
    out["all"] = float(np.mean([it.correct for it in items]))
    return out


def report(items, layers, heads, n_layers, n_heads, val_score) -> str:
    all_heads = (0, n_heads - 1)
    acc = accuracy(items)
    lines = [
        "## Demo model localization benchmark",
        "",
        f"test seed {TEST_SEED}, n={len(items)}; ranges chosen on validation seed {VALIDATION_SEED} "
        f"(mean pointing there {val_score:.3f}); layers/heads are 0-based inclusive",
        "",
        "| answer accuracy | " + " | ".join(acc) + " |",
        "|---" * (len(acc) + 1) + "|",
        "| | " + " | ".join(f"{v:.3f}" for v in acc.values()) + " |",
        "",
        "| heatmap | layers | heads | reduce | pointing game |",
        "|---|---|---|---|---|",
    ]
    for layer in range(n_layers):
        lines.append(
            f"| per layer | {layer}-{layer} | 0-{n_heads - 1} | mean "
            f"| {pointing(items, (layer, layer), all_heads, 'mean'):.3f} |"
        )
    lines.append(
        f"| all layers | 0-{n_layers - 1} | 0-{n_heads - 1} | mean "
        f"| {pointing(items, (0, n_layers - 1), all_heads, 'mean'):.3f} |"
    )
    for reduce in REDUCES:
        lines.append(
            f"| **recommended** | {layers[0]}-{layers[1]} | {heads[0]}-{heads[1]} | {reduce} "
            f"| {pointing(items, layers, heads, reduce):.3f} |"
        )
    correct = [it for it in items if it.correct]
    lines.append(
        f"| recommended, correct answers only (n={len(correct)}) | {layers[0]}-{layers[1]} "
        f"| {heads[0]}-{heads[1]} | mean | {pointing(correct, layers, heads, 'mean'):.3f} |"
    )
    lines.append(
        f"| recommended, argmax on ANY object (diagnostic) | {layers[0]}-{layers[1]} "
        f"| {heads[0]}-{heads[1]} | mean | {pointing(items, layers, heads, 'mean', any_object=True):.3f} |"
    )
    lines.append(
        f"| recommended, argmax cell merely OVERLAPS the target box (diagnostic) | {layers[0]}-{layers[1]} "
        f"| {heads[0]}-{heads[1]} | mean | {pointing(items, layers, heads, 'mean', touch=True):.3f} |"
    )
    for qtype in demo_data.QUESTION_TYPES:
        subset = [it for it in items if it.sample.question_type == qtype]
        lines.append(
            f"| recommended, {qtype} questions (n={len(subset)}) | {layers[0]}-{layers[1]} "
            f"| {heads[0]}-{heads[1]} | mean | {pointing(subset, layers, heads, 'mean'):.3f} |"
        )
    shuffled = np.mean([pointing(items, layers, heads, "mean", shuffle_seed=s) for s in range(5)])
    lines.append(
        f"| shuffled grid (control, 5 shuffles) | {layers[0]}-{layers[1]} | {heads[0]}-{heads[1]} "
        f"| mean | {shuffled:.3f} |"
    )
    chance_cells = np.mean(
        [chance(it.run.vision.grid_hw, it.run.vision.image_box_xyxy, it.sample.box_xyxy) for it in items]
    )
    area = np.mean([demo_data.box_area_fraction(it.sample.box_xyxy, *it.sample.image.size) for it in items])
    lines += [
        "",
        f"chance (share of cells centred in the target box): {chance_cells:.3f}; target box area fraction: {area:.3f}",
    ]
    lines += [
        "",
        "pointing game per head (one layer, one head)",
        "",
        "| layer | " + " | ".join(f"head {h}" for h in range(n_heads)) + " |",
        "|---" * (n_heads + 1) + "|",
    ]
    for layer in range(n_layers):
        lines.append(
            f"| {layer} | "
            + " | ".join(f"{pointing(items, (layer, layer), (h, h), 'mean'):.3f}" for h in range(n_heads))
            + " |"
        )
    return "\n".join(lines)


def method_maps(holder, items: list[Item], layers, heads) -> dict[str, tuple[list[np.ndarray], float]]:
    """The answer token's map by every registered method for every item, with the mean seconds per map."""
    out = {}
    for name, entry in METHODS.items():
        start = time.perf_counter()
        maps = [compute_maps(name, MapRequest(holder, it.run, [0], layers, heads))[0] for it in items]
        out[f"{name}: {entry.description}"] = (maps, (time.perf_counter() - start) / len(items))
    return out


def to_token_grid(heat: np.ndarray, run) -> np.ndarray:
    """A finer (patch) map summed back onto the token grid, which the deletion steps work on."""
    grid_h, grid_w = run.vision.grid_hw
    fy, fx = heat.shape[0] // grid_h, heat.shape[1] // grid_w
    return heat.reshape(grid_h, fy, grid_w, fx).sum(axis=(1, 3))


def methods_report(holder, items: list[Item], layers, heads, n_faith: int) -> str:
    """Pointing game and deletion / insertion AUC (vs a random order) for every map method."""
    lines = [
        "",
        "## Methods compared on the same test images",
        "",
        f"pointing over n={len(items)}; faithfulness AUCs over the first {n_faith} (8 steps, blur baseline)",
        "",
        "| method | pointing game | deletion AUC (map / random) | insertion AUC (map / random) | seconds per map |",
        "|---|---|---|---|---|",
    ]
    for name, (maps, seconds) in method_maps(holder, items, layers, heads).items():
        hits = [
            cell_hits_box(heat, it.run.vision.image_box_xyxy, it.sample.box_xyxy)
            for heat, it in zip(maps, items, strict=True)
        ]
        sums = [
            faithfulness(holder, it.run, 0, to_token_grid(heat, it.run), seed=k).summary()
            for k, (heat, it) in enumerate(zip(maps[:n_faith], items[:n_faith], strict=True))
        ]
        auc = {key: float(np.mean([s[key] for s in sums])) for key in sums[0]}
        lines.append(
            f"| {name} | {np.mean(hits):.3f} | {auc['deletion']:.3f} / {auc['random_deletion']:.3f} "
            f"| {auc['insertion']:.3f} / {auc['random_insertion']:.3f} | {seconds * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo_model")
    p.add_argument("--n", type=int, default=200, help="test images")
    p.add_argument("--n-val", type=int, default=200, help="validation images for choosing the ranges")
    p.add_argument("--n-faith", type=int, default=30, help="images for the method comparison's AUCs (0: skip)")
    p.add_argument(
        "--write-ranges",
        type=Path,
        help="also write the chosen ranges and their figures to this "
        "ranges.json (demo_model/ranges.json holds the demo model's, read by config.DEMO_RANGES)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    random.seed(0)
    holder = ModelHolder.load(args.model, device="cpu", dtype="float32")
    val = run_items(holder, VALIDATION_SEED, args.n_val)
    n_layers, n_heads = holder.num_layers, holder.num_heads
    choice = choose_ranges(val, n_layers, n_heads)
    layers, heads, val_score = choice.layers, choice.heads, choice.pointing
    log.info("validation: layers %s heads %s mean-pointing %.3f", layers, heads, val_score)
    test = run_items(holder, TEST_SEED, args.n)
    print(report(test, layers, heads, n_layers, n_heads, val_score))
    if args.write_ranges:
        test_figures = {
            "seed": TEST_SEED,
            "items": len(test),
            "pointing": pointing(test, layers, heads, "mean"),
            "answer_accuracy": accuracy(test)["all"],
        }
        record = ranges_record(
            args.model, choice, {"seed": VALIDATION_SEED, "answer_accuracy": accuracy(val)["all"]}, test_figures
        )
        args.write_ranges.write_text(ranges_json(record), encoding="utf-8")
    if args.n_faith:
        print(methods_report(holder, test, layers, heads, args.n_faith))


if __name__ == "__main__":
    main()
