"""The localisation scores on synthetic maps whose answers are known."""

import numpy as np
import pytest

from metrics import attention_ratio, cell_coverage, otsu_iou, otsu_threshold, pointing_hit, target_mask
from records import VisionLayout


def _layout(image_size=(400, 400), box=None, grid=(4, 4)) -> VisionLayout:
    box = box or (0.0, 0.0, float(image_size[0]), float(image_size[1]))
    return VisionLayout(np.arange(grid[0] * grid[1]), grid, image_size, box, (56, 56))


def _one_hot(row, col, grid=(4, 4)) -> np.ndarray:
    heat = np.zeros(grid)
    heat[row, col] = 1.0
    return heat


def test_a_map_on_the_target_scores_top_and_one_off_it_scores_nothing():
    layout, region = _layout(), target_mask((400, 400), boxes=[[0, 0, 100, 100]])  # exactly cell (0, 0)
    on, off = _one_hot(0, 0), _one_hot(3, 3)
    assert pointing_hit(on, layout, region) and not pointing_hit(off, layout, region)
    assert attention_ratio(on, layout, region) == pytest.approx(16.0)  # all mass on 1/16 of the area
    assert attention_ratio(off, layout, region) == 0.0
    assert otsu_iou(on, layout, region) == pytest.approx(1.0) and otsu_iou(off, layout, region) == 0.0


def test_a_uniform_map_is_at_chance_and_partial_cells_count_in_proportion():
    layout = _layout()
    region = target_mask((400, 400), boxes=[[0, 0, 50, 100]])  # half of cell (0, 0)
    assert attention_ratio(np.ones((4, 4)), layout, region) == pytest.approx(1.0)
    assert cell_coverage(layout, region)[0, 0] == pytest.approx(0.5)
    assert attention_ratio(_one_hot(0, 0), layout, region) == pytest.approx(0.5 / (5000 / 160000))
    assert otsu_iou(_one_hot(0, 0), layout, region) == pytest.approx(0.5)  # 5000 px of a 10000 px cell
    assert not pointing_hit(_one_hot(0, 0), layout, region)  # the cell's centre is off it


def test_what_the_model_never_saw_is_never_on_target():
    layout = _layout(image_size=(400, 300), box=(50.0, 0.0, 350.0, 300.0), grid=(4, 4))  # a centre crop
    region = target_mask((400, 300), boxes=[[0, 0, 50, 300]])  # left of the crop only
    heat = np.random.default_rng(0).random((4, 4))
    assert not pointing_hit(heat, layout, region) and attention_ratio(heat, layout, region) == 0.0
    assert otsu_iou(heat, layout, region) == 0.0


def test_masks_and_boxes_combine_and_bad_targets_are_refused():
    mask = np.zeros((400, 400), dtype=bool)
    mask[300:, 300:] = True  # cell (3, 3)
    region = target_mask((400, 400), boxes=[[0, 0, 100, 100]], mask=mask)
    assert region.sum() == 2 * 100 * 100
    assert pointing_hit(_one_hot(3, 3), _layout(), region)
    with pytest.raises(ValueError, match="image's own size"):
        target_mask((400, 400), mask=np.ones((10, 10), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        target_mask((400, 400))
    with pytest.raises(ValueError, match="x1 > x0"):
        target_mask((400, 400), boxes=[[10, 10, 5, 20]])
    with pytest.raises(ValueError, match="token grid"):
        pointing_hit(np.ones((2, 2)), _layout(), region)
    with pytest.raises(ValueError, match="non-negative"):
        attention_ratio(-np.ones((4, 4)), _layout(), region)


def test_otsus_threshold_splits_two_clusters():
    values = np.concatenate([np.full(30, 0.1), np.full(10, 0.9)])
    threshold = otsu_threshold(values)
    assert 0.1 < threshold <= 0.9 and (values >= threshold).sum() == 10
    assert otsu_threshold(np.full(5, 0.3)) == pytest.approx(0.3)  # flat: nothing stands out


def test_the_bootstrap_interval_holds_the_mean_shrinks_with_more_items_and_repeats_for_a_seed():
    from metrics import bootstrap_interval

    rng = np.random.default_rng(3)
    small, large = rng.random(20), rng.random(2000)
    mean, lo, hi = bootstrap_interval(small)
    assert lo < mean < hi and mean == pytest.approx(small.mean())
    _, lo_large, hi_large = bootstrap_interval(large)
    assert hi_large - lo_large < (hi - lo) / 4  # about 1/sqrt(100) as wide
    assert bootstrap_interval(small, seed=7) == bootstrap_interval(small, seed=7)
    assert bootstrap_interval(small, seed=7) != bootstrap_interval(small, seed=8)
    assert bootstrap_interval([0.25] * 9) == (0.25, 0.25, 0.25)  # constant: nothing to resample
    assert bootstrap_interval([True, False, np.nan]) == bootstrap_interval([1.0, 0.0])  # NaN left out
    assert all(np.isnan(v) for v in bootstrap_interval([np.nan]))
    _, lo90, hi90 = bootstrap_interval(small, confidence=0.9)
    assert lo <= lo90 and hi90 <= hi
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(small, confidence=1.0)


def test_a_function_words_map_scores_the_image_it_leaves_dark():
    from metrics import off_share

    layout = _layout()  # 4 x 4 cells over 400 x 400 px, each 1/16 of the area
    assert off_share(_one_hot(1, 2), layout) == pytest.approx(15 / 16)  # all mass in one cell: dark elsewhere
    two = _one_hot(0, 0) + _one_hot(3, 3)
    assert off_share(two, layout) == pytest.approx(14 / 16)
    assert off_share(np.full((4, 4), 0.3), layout) == 0.0  # flat: spread over everything, nothing dark
    assert off_share(np.zeros((4, 4)), layout) == 1.0  # no mass at all: it points nowhere
    wide = _layout(image_size=(400, 200), box=(0.0, 0.0, 400.0, 200.0), grid=(1, 2))
    assert off_share(np.array([[0.0, 1.0]]), wide) == pytest.approx(0.5)  # by area, in the image's pixels
    with pytest.raises(ValueError, match="non-negative"):
        off_share(-np.ones((4, 4)), layout)
