"""Does the map matter to the model? Deletion and insertion curves for one token's map.

Token cells are blurred away (deletion) or restored into a blurred image (insertion) in the order
the map ranks them, and the probability of the token, teacher-forced, is read after each step.
A faithful map makes the probability fall fast on deletion and rise fast on insertion, compared
with a random order of the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

from errors import InputError
from records import AttentionRun


@dataclass
class Faithfulness:
    """Curves over the fraction of cells changed (0..1): the token's probability at each step.

    fractions: (n,) 0..1; deletion / insertion: (n,) probabilities in map order; random_deletion /
    random_insertion: the same in a random order. *_auc: the mean of each curve (trapezoid rule).
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    random_deletion: np.ndarray
    random_insertion: np.ndarray

    @staticmethod
    def auc(curve: np.ndarray) -> float:
        return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))

    def summary(self) -> dict[str, float]:
        return {
            name: self.auc(getattr(self, name))
            for name in ("deletion", "random_deletion", "insertion", "random_insertion")
        }


def blurred(image: Image.Image, cell_px: float) -> np.ndarray:
    """(H, W, 3) uint8: the image blurred at about one token cell, the 'removed' baseline."""
    sigma = max(1.0, cell_px / 2)
    return cv2.GaussianBlur(np.asarray(image.convert("RGB")), (0, 0), sigmaX=sigma, sigmaY=sigma)


def token_probability(holder, run: AttentionRun, step_idx: int, image: Image.Image | None = None) -> float:
    """p(generated token step_idx | image, prompt, earlier tokens), one teacher-forced forward.

    image: in place of the run's first image (same size); the run's own by default."""
    images = None if image is None else [image, *run.images[1:]]
    inputs = holder.replay_inputs(run, step_idx, images)
    with torch.inference_mode():
        logits = holder.model(**inputs).logits[0, -1].float()  # (vocab,)
    return float(torch.softmax(logits, dim=-1)[run.generated_ids[step_idx]])


def faithfulness(
    holder, run: AttentionRun, step_idx: int, heat: np.ndarray, steps: int = 8, seed: int = 0
) -> Faithfulness:
    """Deletion and insertion curves for `heat` (grid_h, grid_w) over the run's first image, against
    one seeded random order. Costs 4 * (steps + 1) forward passes.
    """
    if heat.shape != tuple(run.vision.grid_hw):
        raise ValueError(f"The map has shape {heat.shape}, but the token grid is {run.vision.grid_hw}.")
    if not run.images:
        raise InputError(
            "Verifying blurs the run's image, and this run has none (a video). Generate from an image first."
        )
    image = run.images[0]
    original = np.asarray(image)
    cells = run.vision.cell_slices()
    cell_px = (run.vision.image_box_xyxy[2] - run.vision.image_box_xyxy[0]) / run.vision.grid_hw[1]
    base = original.copy()  # outside the grid's box the model sees the original
    blur = blurred(image, cell_px)
    for rows, cols in cells:
        base[rows, cols] = blur[rows, cols]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    order = np.argsort(-heat.ravel(), kind="stable")
    random_order = np.random.default_rng(seed).permutation(len(cells))

    def curve(ranking: np.ndarray, start: np.ndarray, fill: np.ndarray) -> np.ndarray:
        probs = []
        for fraction in fractions:
            canvas = start.copy()
            for j in ranking[: int(round(fraction * len(cells)))]:
                rows, cols = cells[j]
                canvas[rows, cols] = fill[rows, cols]
            probs.append(token_probability(holder, run, step_idx, Image.fromarray(canvas)))
        return np.array(probs, dtype=np.float32)

    return Faithfulness(
        fractions,
        curve(order, original, base),
        curve(order, base, original),
        curve(random_order, original, base),
        curve(random_order, base, original),
    )
