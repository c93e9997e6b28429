"""A study's files, written by the main process from the merged part files.

    DIR/results.parquet, results.csv   one row per item and map (`study_items.COLUMNS`)
    DIR/heads.parquet, heads.csv       with per_head: per item, one row per layer's mean map over all its
                                       heads (head_idx empty) and one per (layer, head) map
    DIR/ranges.json                    with per_head and validation items: the ranges chosen on them
                                       (`localization.choose_ranges`) and their figures on the test items
    DIR/localization_heads.png         with per_head: pointing accuracy per (layer, head)
    DIR/localization_layers.png        with per_head: pointing accuracy per layer (all its heads)
    DIR/knockout.parquet, knockout.csv with knockout: per item, the layer sweep's rows
                                       (`study_knockout.SWEEP_COLUMNS`); results then also hold the
                                       item's KNOCKOUT_COLUMNS
    DIR/function_words.parquet, .csv   with function_words: per item, method and generated function word,
                                       its map's function score (`study_function_words.FUNCTION_COLUMNS`)
    DIR/summary.md                     the headline numbers (per method: the scores' means with their 95%
                                       bootstrap intervals, ms per map) and every problem

The tables hold the items in manifest order; parquet keeps the types (pyarrow), csv is for everything else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from metrics import bootstrap_interval
from pictures.study_plots import accuracy_by_layer_png, layer_head_matrix_png
from study.function_words import function_summary, function_table
from study.items import COLUMNS, HEAD_COLUMNS, StudySettings
from study.knockout import KNOCKOUT_COLUMNS, knockout_summary, knockout_table
from study.localization import choose_ranges, contiguous_ranges, pointing_at, ranges_json, ranges_record, unpack_hits
from study.manifest import Item, is_validation

logger = logging.getLogger(__name__)


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet would run as a formula


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with every text cell that a spreadsheet would run as a formula (it begins with =, +, -, @,
    a tab or a carriage return; a prompt, an id, a generated word) behind a leading apostrophe, which
    spreadsheets show as text. Numbers are untouched; the Parquet file keeps the exact text."""
    safe = frame.copy()
    for column in safe.columns:
        if pd.api.types.is_object_dtype(safe[column]) or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(
                lambda value: "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value
            )
    return safe


def _write_table(frame: pd.DataFrame, out: Path, name: str) -> None:
    spreadsheet_safe(frame).to_csv(out / f"{name}.csv", index=False)
    try:
        frame.to_parquet(out / f"{name}.parquet", index=False)
    except ImportError:
        logger.info("pyarrow is not installed: %s.parquet skipped (%s.csv has the same rows)", name, name)


def head_accuracy(heads: pd.DataFrame) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(captured layer indices, (L, H) pointing accuracy per (layer, head), (L,) per layer over all heads)."""
    single = heads.dropna(subset=["head_idx"]).pivot_table(
        index="layer_idx", columns="head_idx", values="pointing_hit", aggfunc="mean"
    )
    layer = heads[heads["head_idx"].isna()].groupby("layer_idx")["pointing_hit"].mean()
    return [int(v) for v in single.index], single.to_numpy(dtype=np.float64), layer.to_numpy(dtype=np.float64)


def _answer_accuracy(chosen: list[Item], finished: dict[str, dict]) -> float | None:
    known = [row["correct"] for item in chosen for row in finished[item.id]["rows"][:1] if row["correct"] is not None]
    return float(np.mean(known)) if known else None


def choose_study_ranges(
    items: list[Item],
    finished: dict[str, dict],
    layer_indices: list[int],
    num_heads: int,
    model_id: str,
    val_fraction: float,
) -> dict | None:
    """The ranges.json record: ranges chosen on the validation items, figures on both sets; None when no
    finished item is a validation item."""
    layer_ranges, head_ranges = contiguous_ranges(layer_indices), contiguous_ranges(range(num_heads))
    shape = (len(layer_ranges), len(head_ranges))
    scored = [item for item in items if item.id in finished and finished[item.id]["range_hits"]]
    validation = [item for item in scored if is_validation(item, val_fraction)]
    test = [item for item in scored if not is_validation(item, val_fraction)]
    if not validation:
        return None

    def hits(chosen: list[Item]) -> np.ndarray:  # (n_items, n_lr, n_hr) bool
        return (
            np.stack([unpack_hits(finished[item.id]["range_hits"], shape) for item in chosen])
            if chosen
            else np.zeros((0, *shape), dtype=bool)
        )

    choice = choose_ranges(hits(validation), layer_ranges, head_ranges)
    everything = ((layer_indices[0], layer_indices[-1]), (0, num_heads - 1))
    figures = [
        {
            "items": len(chosen),
            "pointing": pointing_at(hits(chosen), layer_ranges, head_ranges, choice.layers, choice.heads),
            "pointing_all_layers_and_heads": pointing_at(hits(chosen), layer_ranges, head_ranges, *everything),
            "answer_accuracy": _answer_accuracy(chosen, finished),
        }
        for chosen in (validation, test)
    ]
    figures[0].pop("items")  # ranges_record counts them
    return ranges_record(model_id, choice, *figures)


def _localization(out: Path, heads: pd.DataFrame, record: dict | None) -> list[str]:
    """The plots, and the summary's lines about the heads and the chosen ranges."""
    layers, matrix, per_layer = head_accuracy(heads)
    items = heads["item_id"].nunique()
    layer_head_matrix_png(
        matrix, layers, out / "localization_heads.png", f"Pointing accuracy per (layer, head), {items} items"
    )
    accuracy_by_layer_png(
        per_layer,
        layers,
        out / "localization_layers.png",
        f"Pointing accuracy per layer (mean map over its heads), {items} items",
    )
    order = np.argsort(matrix, axis=None)[::-1][:5]
    best = ", ".join(
        f"layer {layers[i // matrix.shape[1]]} head {i % matrix.shape[1]} ({matrix.flat[i]:.3f})" for i in order
    )
    lines = [
        "",
        "## Localisation heads",
        "",
        f"Best single heads by pointing accuracy: {best}.",
        "Per layer (all heads): "
        + ", ".join(f"{layer}: {v:.3f}" for layer, v in zip(layers, per_layer, strict=True))
        + ".",
        "",
        "![pointing accuracy per layer and head](localization_heads.png)",
        "![pointing accuracy per layer](localization_layers.png)",
    ]
    if record is None:
        return lines + ["", "No validation items, so no ranges were chosen: give --val-fraction or a split column."]
    val, test = record["validation"], record["test"]
    on_test = (
        (
            f"{test['pointing']:.3f} on the {test['items']} test items (all layers and heads: "
            f"{test['pointing_all_layers_and_heads']:.3f})"
        )
        if test["items"]
        else "no test items to report on"
    )
    return lines + [
        "",
        f"**Chosen on {val['items']} validation items:** layers {record['layers'][0]}-"
        f"{record['layers'][1]}, heads {record['heads'][0]}-{record['heads'][1]} (ranges.json). "
        f"Pointing {val['pointing']:.3f} on them; {on_test}.",
    ]


BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0  # the summary's intervals: the same table on every rerun


def _interval(values) -> str:
    """'mean [lo, hi]' to 3 decimals: the mean over items and its 95% percentile bootstrap interval."""
    mean, lo, hi = bootstrap_interval(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
    return "—" if np.isnan(mean) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def method_table(results: pd.DataFrame) -> list[str]:
    """The per-method table in Markdown lines: per method (and relative variant), the items it scored, its
    pointing game, attention ratio and Otsu IoU as means over items with their 95% bootstrap intervals,
    and the mean milliseconds per map ("—" where no row has a time: rows of a study older than
    map_seconds)."""
    lines = [
        f"Means over items, with 95% percentile-bootstrap intervals over items in brackets "
        f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}); ms per map is the mean wall time of one map.",
        "",
        "| method | layers | heads | items | pointing game | attention ratio (1 = chance) | Otsu IoU | ms per map |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, relative), rows in results.groupby(["method", "relative"], sort=False):
        name = f"{method}, relative to a generic prompt" if relative else method
        seconds = pd.to_numeric(rows["map_seconds"], errors="coerce").dropna()
        ms = f"{seconds.mean() * 1000:.1f}" if len(seconds) else "—"
        lines.append(
            f"| {name} | {rows['layers'].iloc[0]} | {rows['heads'].iloc[0]} | {rows['item_id'].nunique()} | "
            f"{_interval(rows['pointing_hit'].astype(float))} | {_interval(rows['attention_ratio'])} | "
            f"{_interval(rows['iou'])} | {ms} |"
        )
    return lines


def summary(results: pd.DataFrame, problems: list[str], model_id: str) -> str:
    """The headline numbers in Markdown."""
    scored = results["item_id"].nunique() if len(results) else 0
    lines = [f"# Study of {model_id}", "", f"{scored} items scored; {len(problems)} problems (listed below).", ""]
    if len(results):
        lines += method_table(results)
        known = results.drop_duplicates("item_id")["correct"].dropna()
        if len(known):
            lines += ["", f"Answers correct: {known.astype(float).mean():.3f} of {len(known)}."]
    return "\n".join(lines) + "\n"


def _results(done: list[dict], settings: StudySettings) -> pd.DataFrame:
    """The results table: COLUMNS, and with knockout the item's KNOCKOUT_COLUMNS (float, NaN where not
    scored) on every row of the item."""
    if not settings.knockout:
        return pd.DataFrame([row for record in done for row in record["rows"]], columns=list(COLUMNS))
    rows = [{**row, **(record.get("knockout") or {})} for record in done for row in record["rows"]]
    results = pd.DataFrame(rows, columns=list(COLUMNS + KNOCKOUT_COLUMNS))
    return results.astype(dict.fromkeys(KNOCKOUT_COLUMNS, "float64"))


def write_outputs(
    out: Path, items: list[Item], finished: dict[str, dict], problems: list[str], model_id: str, settings: StudySettings
) -> tuple[pd.DataFrame, list[str]]:
    """Merge the finished items in manifest order and write every file; returns (results, problems)."""
    done = [finished[item.id] for item in items if item.id in finished]
    problems = problems + [
        f"{item.where}: {why}; that method skipped, the others scored"
        for item in items
        if item.id in finished
        for why in finished[item.id]["problems"]
    ]
    results = _results(done, settings)
    _write_table(results, out, "results")
    text = summary(results, problems, model_id)
    if settings.knockout:
        sweep = knockout_table(done)
        _write_table(sweep, out, "knockout")
        per_item = pd.DataFrame([record.get("knockout") or {} for record in done], columns=list(KNOCKOUT_COLUMNS))
        text += "\n".join(knockout_summary(per_item, sweep, settings.knockout)) + "\n"
    if settings.function_words:
        words = function_table(done)
        _write_table(words, out, "function_words")
        text += "\n".join(function_summary(words, results)) + "\n"
    if settings.per_head and done:
        heads = pd.DataFrame([row for record in done for row in record["head_rows"]], columns=list(HEAD_COLUMNS))
        heads["head_idx"] = heads["head_idx"].astype("Int64")  # empty: the layer's mean map
        _write_table(heads, out, "heads")
        layers = sorted(int(v) for v in heads["layer_idx"].unique())
        record = choose_study_ranges(
            items, finished, layers, int(heads["head_idx"].max()) + 1, model_id, settings.val_fraction
        )
        if record is not None:
            (out / "ranges.json").write_text(ranges_json(record), encoding="utf-8")
        text += "\n".join(_localization(out, heads, record)) + "\n"
    if problems:
        text += "\n".join(["", "## Problems", *[f"- {problem}" for problem in problems]]) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return results, problems
