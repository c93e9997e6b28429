"""One study item scored: generate, pick the token, make each method's map, score it against the target.

For each item and map method (`attention`: raw attention over the chosen layer and head ranges;
`rollout` and `gradient` over every layer; `vit`: the raw map pushed back through the vision encoder,
on its patch grid, where `families.supports_vit_map` allows) the scored token's map is scored by
`metrics` (pointing game, attention ratio, Otsu IoU). With `relative`, each attention map is also
scored divided by the map of a generic prompt on the same image, as the app's "Relative to a generic
prompt" does. With `per_head`, every single layer's map (all its heads) and every (layer, head) map is
scored too, and `localization.range_hits` records which pairs of ranges point at the target. With
`knockout`, the causal checks of `study.knockout` (per item columns and a layer sweep). A method a model
cannot give is named in the item's problems; its other methods are kept. With `function_words`, each
method's maps of the answer's function words too (`study.function_words`).

The scored token is the manifest's `target` word, or the answer's first word. A target the tokenizer split
into several generated tokens is scored as one map per method: the sum of its tokens' maps (with
`per_head`, of their rows); the knockouts read the probability of its first token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from analysis import relative_heatmap
from attention_processor import RAW_ATTENTION, combine_maps, token_heatmap, vision_attention
from errors import InputError
from methods import METHODS, MapRequest, compute_maps, generic_baseline
from metrics import attention_ratio, attention_ratios, off_share, otsu_iou, pointing_cells, pointing_hit, target_mask
from model_holder import ModelHolder
from study.function_words import function_steps
from study.knockout import KNOCKOUTS, NO_BOX, empty_knockout, knockout_columns, sweep_rows
from study.localization import pack_hits, range_hits
from study.manifest import Item, spelling
from utils import load_image

COLUMNS = (
    "item_id",
    "split",
    "image",
    "prompt",
    "answer",
    "expected",
    "correct",
    "token",
    "method",
    "relative",
    "layers",
    "heads",
    "pointing_hit",
    "attention_ratio",
    "iou",
    "map_seconds",  # wall time of the map (with relative: and of the generic prompt's pass); after the
    # scores, so that a reader of the older columns finds them where they were
)
HEAD_COLUMNS = ("item_id", "split", "correct", "layer_idx", "head_idx", "pointing_hit", "attention_ratio")


@dataclass(frozen=True)
class StudySettings:
    """How every item is scored. Ranges are 0-based inclusive; None means all."""

    layers: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None
    max_new_tokens: int = 16
    methods: tuple[str, ...] = (RAW_ATTENTION,)
    relative: bool = False  # also the attention map over the generic-prompt map
    per_head: bool = False  # also every layer's and every (layer, head)'s map
    val_fraction: float = 0.0  # share of ids (without a split) that choose the ranges
    knockout: tuple[str, ...] = ()  # causal checks of study.knockout: any of KNOCKOUTS
    knockout_window: int = 9  # layers per window of the knockout sweep
    knockout_draws: int = 8  # random control regions per item
    function_words: bool = False  # also score the maps of the answer's function words (study.function_words)

    def check(self) -> None:
        """Raise ValueError naming the fix (before any model is loaded)."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be a whole number of at least 1, got {self.max_new_tokens!r}.")
        unknown = [name for name in self.methods if name not in METHODS]
        if unknown or not self.methods:
            raise InputError(f"Unknown map method(s) {unknown}; choose from {', '.join(METHODS)}.")
        unknown = [name for name in self.knockout if name not in KNOCKOUTS]
        if unknown:
            raise InputError(f"Unknown knockout(s) {unknown}; choose from {', '.join(KNOCKOUTS)} (a comma list).")
        if self.knockout_window < 1 or self.knockout_draws < 1:
            raise InputError(
                f"--knockout-window and --knockout-draws must be at least 1, got {self.knockout_window} "
                f"and {self.knockout_draws}."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be at least 0 and below 1, got {self.val_fraction}.")


@dataclass
class ItemScores:
    """One item's scores: results rows (COLUMNS), per-head rows (HEAD_COLUMNS), the packed range hits
    (`localization.pack_hits` of (n_layer_ranges, n_head_ranges); empty without per_head), with
    knockout its `study.knockout.KNOCKOUT_COLUMNS` (None where not scored; empty without) and sweep rows
    (SWEEP_COLUMNS), with function_words the rows of `study.function_words.FUNCTION_COLUMNS` (empty
    without), and what could not be scored."""

    item_id: str
    rows: list[dict] = field(default_factory=list)
    head_rows: list[dict] = field(default_factory=list)
    range_hits: str = ""
    problems: list[str] = field(default_factory=list)
    knockout: dict = field(default_factory=dict)
    knockout_rows: list[dict] = field(default_factory=list)
    function_rows: list[dict] = field(default_factory=list)


def scored_steps(tokens: list[str], target: str | None) -> list[int]:
    """The generated tokens to score, 0-based steps: with a target, the first run of consecutive tokens
    whose joined text is the target (spaces and case ignored; a run starts at a token with some text),
    one token or a word the tokenizer split ("ap", "ple" for "apple"); by default the first token with a
    letter or digit in it."""
    if not target:
        for step, token in enumerate(tokens):
            if any(ch.isalnum() for ch in token):
                return [step]
        raise InputError("the answer has no word to score")
    wanted = spelling(target)
    for start in range(len(tokens)):
        joined = ""
        for step in range(start, len(tokens)):
            joined += spelling(tokens[step])
            if not joined or not wanted.startswith(joined):
                break
            if joined == wanted:
                return list(range(start, step + 1))
    raise InputError(f"no generated token, nor run of consecutive tokens, spells {target!r}")


def _scores(heat: np.ndarray, run, region: np.ndarray) -> dict:
    """The three scores of one map, on `_layout`."""
    layout = _layout(heat, run)
    return {
        "pointing_hit": pointing_hit(heat, layout, region),
        "attention_ratio": attention_ratio(heat, layout, region),
        "iou": otsu_iou(heat, layout, region),
    }


def _per_head(run, steps: list[int], region: np.ndarray, common: dict) -> tuple[list[dict], str]:
    """Rows for every captured layer's mean map (head_idx None) and every (layer, head) map of the scored
    steps (summed over them), and the packed pointing hits of every pair of contiguous ranges."""
    values = sum(vision_attention(run, step).numpy() for step in steps)  # (L, H, N) float32
    num_layers, num_heads, _ = values.shape
    cell_hit = pointing_cells(run.vision, region)  # (N,)
    maps = np.concatenate([values.mean(axis=1, keepdims=True), values], axis=1)  # (L, 1 + H, N): mean first
    hits = cell_hit[np.argmax(maps, axis=2)]  # (L, 1 + H)
    ratios = attention_ratios(maps.reshape(-1, *run.vision.grid_hw), run.vision, region).reshape(hits.shape)
    rows = [
        {
            **common,
            "layer_idx": run.layer_indices[i],
            "head_idx": None if k == 0 else k - 1,
            "pointing_hit": bool(hits[i, k]),
            "attention_ratio": float(ratios[i, k]),
        }
        for i in range(num_layers)
        for k in range(num_heads + 1)
    ]
    return rows, pack_hits(range_hits(values, cell_hit))


def _layout(heat: np.ndarray, run):
    """The layout a map is scored on: the run's, or for a map finer than the token grid (the ViT map's
    patches, over the same box) the run's with the finer grid."""
    return run.vision if heat.shape == tuple(run.vision.grid_hw) else replace(run.vision, grid_hw=heat.shape)


def _function_words(holder, run, steps: list[int], ranges: tuple, where: dict, scores) -> None:
    """Append to `scores.function_rows` the function score of each generated function word's map by the
    method `where` names (`study.function_words`); a map that fails is a problem."""
    found = function_steps(run.generated_tokens, steps)
    if not found:
        return
    try:
        maps = compute_maps(where["method"], MapRequest(holder, run, found, *ranges))  # per step: (gh, gw) or patches
    except (ValueError, MemoryError) as err:
        scores.problems.append(f"{where['method']} of the function words: {err}")
        return
    scores.function_rows += [
        {
            **{key: where[key] for key in ("item_id", "split", "method", "layers", "heads")},
            "step_idx": step,
            "token": run.generated_tokens[step],
            "function_score": off_share(heat, _layout(heat, run)),
        }
        for step, heat in zip(found, maps, strict=True)
    ]


def _knockout(holder: ModelHolder, item: Item, run, step: int, settings: StudySettings, maps: tuple, scores) -> None:
    """Fill `scores.knockout` and `scores.knockout_rows` for the item's boxes; what fails is a problem."""
    scores.knockout = empty_knockout()
    if not item.boxes:
        scores.problems.append(NO_BOX)
        return
    draws = settings.knockout_draws
    try:
        scores.knockout = knockout_columns(holder, run, step, item.boxes, maps, settings.knockout, draws)
    except (ValueError, MemoryError) as err:
        scores.problems.append(f"knockout: {err}")
    common = {"item_id": item.id, "split": item.split}
    try:
        scores.knockout_rows = sweep_rows(holder, run, step, item.boxes[0], common, settings.knockout_window, draws)
    except (ValueError, MemoryError) as err:
        scores.problems.append(f"knockout sweep: {err}")


def score_item(holder: ModelHolder, item: Item, settings: StudySettings) -> ItemScores:
    """Every map of one item scored. Raises ValueError or OSError when the item cannot be scored at all
    (an unreadable image, no word to score); a single method that fails for this model or item (the ViT
    map on a tower it does not follow, a gradient pass over the memory cap) is named in `problems`."""
    layers = settings.layers or (0, holder.num_layers - 1)
    heads = settings.heads or (0, holder.num_heads - 1)
    image = load_image(item.image)
    run = holder.generate(image, item.prompt, max_new_tokens=settings.max_new_tokens)
    steps = scored_steps(run.generated_tokens, item.target)
    mask = np.asarray(load_image(item.mask).convert("L")) > 0 if item.mask else None  # bounded like images
    region = target_mask(image.size, item.boxes or (), mask)
    answer = holder.processor.tokenizer.decode(run.generated_ids, skip_special_tokens=True).strip()
    expected = item.expected
    correct = None if expected is None else answer.lower() == str(expected).lower()
    common = {
        "item_id": item.id,
        "split": item.split,
        "image": str(item.image),
        "prompt": item.prompt,
        "answer": answer,
        "expected": expected,
        "correct": correct,
        "token": "".join(run.generated_tokens[step] for step in steps),  # the word, when it took several
    }
    scores = ItemScores(item.id)
    for name in settings.methods:
        ranged = METHODS[name].uses_ranges  # the others use every layer
        where = {
            "method": name,
            "relative": False,
            "layers": f"{layers[0]}-{layers[1]}" if ranged else "all",
            "heads": f"{heads[0]}-{heads[1]}" if ranged else "all",
        }
        start = time.perf_counter()
        try:
            maps = compute_maps(name, MapRequest(holder, run, steps, layers, heads))  # per step: (gh, gw) or patches
            heat = combine_maps(maps, "sum")  # the word's map
        except (ValueError, MemoryError) as err:
            scores.problems.append(f"{name}: {err}")
            continue
        seconds = time.perf_counter() - start
        scores.rows.append({**common, **where, **_scores(heat, run, region), "map_seconds": seconds})
        if settings.relative and name == RAW_ATTENTION:
            start = time.perf_counter()
            generic = token_heatmap(generic_baseline(holder, run), 0, layers, heads)  # (grid_h, grid_w)
            heat = relative_heatmap(heat, generic)  # (grid_h, grid_w)
            seconds += time.perf_counter() - start
            scores.rows.append(
                {**common, **where, "relative": True, **_scores(heat, run, region), "map_seconds": seconds}
            )
        if settings.function_words:
            _function_words(
                holder, run, steps, (layers, heads), {"item_id": item.id, "split": item.split, **where}, scores
            )
    if settings.per_head:
        head_common = {"item_id": item.id, "split": item.split, "correct": correct}
        scores.head_rows, scores.range_hits = _per_head(run, steps, region, head_common)
    if settings.knockout:  # the probability of the word's first token
        _knockout(holder, item, run, steps[0], settings, (layers, heads), scores)
    return scores
