"""A dataset study: a manifest of image-question pairs with target regions in, scored maps out.

    python batch.py --model M --manifest items.jsonl --out DIR [--layers 1-3] [--heads 0-3]

The manifest (a JSONL or CSV file, or a Hugging Face imagefolder; see `manifest.py`) lists the items:
an image, a prompt, the target region and optionally the expected answer. A bad row is reported with
its line number and skipped; it never stops the study.

For each item and map method (`attention`: raw attention over the chosen layer and head ranges;
`rollout` and `gradient` over every layer; `vit`: the raw map pushed back through the vision encoder,
on its patch grid, where `families.supports_vit_map` allows) the scored token's map is scored by
`metrics` (pointing game, attention ratio, Otsu IoU). With `relative`, each attention map is also
scored divided by the map of a generic prompt on the same image, as the app's "Relative to a generic
prompt" does. A method a model cannot give is reported per item; the item's other methods are kept.
Written to DIR: `results.csv` (and `results.parquet` when pyarrow is installed), one row per item
and map, and `summary.md`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from analysis import GENERIC_PROMPT, relative_heatmap
from attention_processor import token_heatmap
from explain import gradient_map, rollout_map, vit_combined_map
from manifest import Item, read_manifest
from metrics import attention_ratio, otsu_iou, pointing_hit, target_mask
from model_holder import ModelHolder
from utils import load_image

logger = logging.getLogger(__name__)
COLUMNS = ("item_id", "split", "image", "prompt", "answer", "expected", "correct", "token", "method", "relative",
           "layers", "heads", "pointing_hit", "attention_ratio", "iou")


def scored_step(tokens: list[str], target: str | None) -> int:
    """The generated token to score: the first whose text is `target` (case and spaces ignored), or by
    default the first with a letter or digit in it."""
    for step, token in enumerate(tokens):
        text = token.strip().lower()
        if (text == target.strip().lower()) if target else any(ch.isalnum() for ch in text):
            return step
    raise ValueError(f"no generated token matches {target!r}" if target else "the answer has no word to score")


STUDY_METHODS = ("attention", "rollout", "gradient", "vit")     # the app's names (stored_run.METHODS)


def method_map(holder: ModelHolder, run, step: int, method: str, layers, heads) -> np.ndarray:
    """The map of generated token `step` by `method`: (grid_h, grid_w), or the ViT map's patch grid
    (2 * grid_h, 2 * grid_w for Qwen). The ranges apply to raw attention and to the map ViT starts from."""
    if method == "attention":
        return token_heatmap(run, step, layers, heads)
    if method == "rollout":
        return rollout_map(holder, run, step)
    if method == "gradient":
        return gradient_map(holder, run, step)
    if method == "vit":
        return vit_combined_map(holder, run, token_heatmap(run, step, layers, heads))
    raise ValueError(f"Unknown method {method!r}; choose from {', '.join(STUDY_METHODS)}.")


def generic_baseline(holder: ModelHolder, run):
    """The same image under the generic prompt, one token, with the run's own pixel budget (as the app's
    `pipeline.relative_baseline`): what a relative map is divided by."""
    made = run.settings
    return holder.generate(run.images, GENERIC_PROMPT, max_new_tokens=1, prompt_rows="none",
                           min_pixels=made.min_pixels, max_pixels=made.max_pixels)


def _scores(heat: np.ndarray, run, region: np.ndarray) -> dict:
    """The three scores of one map. A map finer than the token grid (the ViT map's patches) covers the
    same box, so its layout is the run's with the finer grid."""
    layout = run.vision if heat.shape == tuple(run.vision.grid_hw) else replace(run.vision, grid_hw=heat.shape)
    return {"pointing_hit": pointing_hit(heat, layout, region),
            "attention_ratio": attention_ratio(heat, layout, region), "iou": otsu_iou(heat, layout, region)}


def score_item(holder: ModelHolder, item: Item, layers: tuple[int, int], heads: tuple[int, int],
               max_new_tokens: int = 16, methods: tuple[str, ...] = ("attention",),
               relative: bool = False) -> tuple[list[dict], list[str]]:
    """(the rows of results for one item, one per method and map; what could not be scored for it).
    A method that fails for this model or item (the ViT map on a tower it does not follow, a gradient
    pass over the memory cap) is named in the second list and the other methods are kept."""
    image = load_image(item.image)
    run = holder.generate(image, item.prompt, max_new_tokens=max_new_tokens)
    step = scored_step(run.generated_tokens, item.target)
    mask = np.asarray(Image.open(item.mask).convert("L")) > 0 if item.mask else None
    region = target_mask(image.size, item.boxes or (), mask)
    answer = holder.processor.tokenizer.decode(run.generated_ids, skip_special_tokens=True).strip()
    expected = item.expected
    correct = None if expected is None else answer.lower() == str(expected).lower()
    common = {"item_id": item.id, "split": item.split, "image": str(item.image), "prompt": item.prompt,
              "answer": answer, "expected": expected, "correct": correct, "token": run.generated_tokens[step]}
    rows, failed = [], []
    for method in methods:
        ranged = method in ("attention", "vit")                              # the others use every layer
        where = {"method": method, "relative": False, "layers": f"{layers[0]}-{layers[1]}" if ranged else "all",
                 "heads": f"{heads[0]}-{heads[1]}" if ranged else "all"}
        try:
            heat = method_map(holder, run, step, method, layers, heads)      # (grid_h, grid_w) or patches
        except (ValueError, MemoryError) as err:
            failed.append(f"{method}: {err}")
            continue
        rows.append({**common, **where, **_scores(heat, run, region)})
        if relative and method == "attention":
            generic = token_heatmap(generic_baseline(holder, run), 0, layers, heads)   # (grid_h, grid_w)
            rows.append({**common, **where, "relative": True,
                         **_scores(relative_heatmap(heat, generic), run, region)})
    return rows, failed


def run_study(holder: ModelHolder, manifest: str | Path, out: str | Path, layers: tuple[int, int] | None = None,
              heads: tuple[int, int] | None = None, max_new_tokens: int = 16,
              methods: tuple[str, ...] = ("attention",), relative: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Score every usable item with each method; write results and summary to `out`.
    Returns (results, problems)."""
    unknown = [method for method in methods if method not in STUDY_METHODS]
    if unknown or not methods:
        raise ValueError(f"Unknown map method(s) {unknown}; choose from {', '.join(STUDY_METHODS)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = layers or (0, holder.num_layers - 1)
    heads = heads or (0, holder.num_heads - 1)
    items, problems = read_manifest(manifest)
    rows = []
    for item in items:
        where = item.where
        try:
            scored, failed = score_item(holder, item, layers, heads, max_new_tokens, methods, relative)
        except (ValueError, OSError) as err:                              # a bad item never stops the study
            problems.append(f"{where}: {err}; skipped")
            continue
        rows.extend(scored)
        problems += [f"{where}: {failure}; that method skipped, the others scored" for failure in failed]
    results = pd.DataFrame(rows, columns=list(COLUMNS))
    results.to_csv(out / "results.csv", index=False)
    try:
        results.to_parquet(out / "results.parquet", index=False)
    except ImportError:
        logger.info("pyarrow is not installed: results.parquet skipped (results.csv has the same rows)")
    (out / "summary.md").write_text(summary(results, problems, holder.model_id), encoding="utf-8")
    return results, problems


def summary(results: pd.DataFrame, problems: list[str], model_id: str) -> str:
    """The headline numbers in Markdown."""
    scored = results["item_id"].nunique() if len(results) else 0
    lines = [f"# Study of {model_id}", "", f"{scored} items scored; {len(problems)} problems (listed below).", ""]
    if len(results):
        lines += ["| method | layers | heads | pointing game | attention ratio (1 = chance) | Otsu IoU |",
                  "|---|---|---|---|---|---|"]
        for (method, relative), rows in results.groupby(["method", "relative"], sort=False):
            name = f"{method}, relative to a generic prompt" if relative else method
            lines.append(f"| {name} | {rows['layers'].iloc[0]} | {rows['heads'].iloc[0]} | "
                         f"{rows['pointing_hit'].mean():.3f} | {rows['attention_ratio'].mean():.3f} | "
                         f"{rows['iou'].mean():.3f} |")
        known = results.drop_duplicates("item_id")["correct"].dropna()
        if len(known):
            lines += ["", f"Answers correct: {known.astype(float).mean():.3f} of {len(known)}."]
    if problems:
        lines += ["", "## Problems", *[f"- {problem}" for problem in problems]]
    return "\n".join(lines) + "\n"
