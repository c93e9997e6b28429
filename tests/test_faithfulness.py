"""Deletion / insertion curves: their ends, their AUCs and the cell geometry they use."""

import numpy as np
import pytest

from conftest import noise_image
from methods.faithfulness import Faithfulness, faithfulness, token_probability


def test_auc_is_the_trapezoid_mean():
    assert Faithfulness.auc(np.array([1.0, 0.0])) == pytest.approx(0.5)
    assert Faithfulness.auc(np.array([1.0, 1.0, 0.0])) == pytest.approx(0.75)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_curves_start_and_end_where_they_must(load_holder, family):
    holder = load_holder(family)
    image = noise_image(150, 100, seed=3)
    run = holder.generate(
        image, "What is this?", max_new_tokens=2, min_new_tokens=2, suppress_tokens=[holder.model.config.image_token_id]
    )
    heat = np.random.default_rng(0).random(run.vision.grid_hw).astype(np.float32)
    result = faithfulness(holder, run, 1, heat, steps=4)
    original = token_probability(holder, run, 1, image)
    # Nothing deleted = everything inserted = the original image; the reverse ends meet at the blur.
    for curve_start, curve_end in (
        (result.deletion[0], result.insertion[-1]),
        (result.random_deletion[0], result.random_insertion[-1]),
    ):
        assert curve_start == pytest.approx(original, rel=1e-4) and curve_end == pytest.approx(original, rel=1e-4)
    assert result.deletion[-1] == pytest.approx(result.insertion[0], rel=1e-4)
    assert result.deletion[-1] == pytest.approx(result.random_deletion[-1], rel=1e-4)
    assert set(result.summary()) == {"deletion", "random_deletion", "insertion", "random_insertion"}
    with pytest.raises(ValueError, match="token grid"):
        faithfulness(holder, run, 1, np.ones((2, 2)))


def test_cells_tile_the_grid_box_inside_the_image(load_holder):
    holder = load_holder("llava")
    image = noise_image(150, 100)
    run = holder.generate(image, "Hi", max_new_tokens=1)
    cells = run.vision.cell_slices()
    covered = np.zeros((100, 150), dtype=int)
    for rows, cols in cells:
        covered[rows, cols] += 1
    x0, _, x1, _ = (round(v) for v in run.vision.image_box_xyxy)
    assert (covered[:, x0:x1] == 1).all() and (covered[:, :x0] == 0).all() and (covered[:, x1:] == 0).all()
