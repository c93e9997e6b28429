"""Function words in a study (TAM's Func-IoU): the maps of words such as "the" or "of" should point nowhere.

With `function_words`, every generated token of an item's answer whose text is in FUNCTION_WORDS gets
each method's map, scored by `metrics.off_share` (the share of the image below the map's Otsu threshold;
1 = the map leaves the whole image dark). Per method the summary sets the mean object score (the Otsu IoU
of the scored token, `results.iou`) against the mean function score and their F1, 2·o·f / (o + f), as TAM
does: a method scores well only when it both finds the object and keeps function words off the image.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.manifest import spelling

FUNCTION_WORDS = frozenset(
    "a an the this that these those it its is are was were be been am of in on at to for from with by "
    "and or but as there here".split()
)
FUNCTION_COLUMNS = ("item_id", "split", "method", "layers", "heads", "step_idx", "token", "function_score")


def function_steps(tokens: list[str], scored: list[int]) -> list[int]:
    """The 0-based steps of the generated tokens whose text (spaces and case ignored) is a function word,
    the scored word's own steps left out."""
    return [step for step, token in enumerate(tokens) if step not in scored and spelling(token) in FUNCTION_WORDS]


def function_table(done: list[dict]) -> pd.DataFrame:
    """The finished items' function-word rows (FUNCTION_COLUMNS), in manifest order; a record of a study
    scored without the option has none."""
    rows = [row for record in done for row in record.get("function_rows") or ()]
    return pd.DataFrame(rows, columns=list(FUNCTION_COLUMNS)).astype({"function_score": "float64"})


def f1(object_score: float, function_score: float) -> float:
    """2·o·f / (o + f): 0 when both are 0, NaN when either is."""
    if np.isnan(object_score) or np.isnan(function_score):
        return float("nan")
    total = object_score + function_score
    return 2 * object_score * function_score / total if total > 0 else 0.0


def function_summary(table: pd.DataFrame, results: pd.DataFrame) -> list[str]:
    """The summary's section: per method (not the relative variant) the items, the mean object score over
    its scored items, the function-word tokens, the mean function score over them, and the F1."""
    lines = [
        "",
        "## Function words",
        "",
        "Object score: the mean Otsu IoU of the scored token over the items; function score: the mean share "
        "of the image below the Otsu threshold of the map of each generated function word "
        f"({', '.join(sorted(FUNCTION_WORDS))}); F1 = 2·o·f / (o + f), as TAM reports them.",
        "",
    ]
    if not len(table):
        return lines + ["No answer has a function word (they are often one word long: raise --max-new-tokens)."]
    lines += [
        "| method | items | object score | function-word tokens | function score | F1 |",
        "|---|---|---|---|---|---|",
    ]
    plain = results[~results["relative"].astype(bool)]
    for method, rows in plain.groupby("method", sort=False):
        words = table[table["method"] == method]["function_score"]
        o, f = float(rows["iou"].mean()), float(words.mean()) if len(words) else float("nan")
        show = "—" if np.isnan(f) else f"{f:.3f}"
        score = f1(o, f)
        lines.append(
            f"| {method} | {rows['item_id'].nunique()} | {o:.3f} | {len(words)} | {show} | "
            f"{'—' if np.isnan(score) else f'{score:.3f}'} |"
        )
    return lines
