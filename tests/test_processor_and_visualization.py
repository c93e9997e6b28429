"""Pure-function tests: heatmaps from synthetic runs, normalisation and drawing."""

import numpy as np
import pytest
import torch
from PIL import Image

from attention_processor import heatmap_range, normalize_heatmap, token_heatmap, vision_share
from records import AttentionRun, VisionLayout
from visualization import COLORMAPS, draw_grid, heatmap_image, overlay, side_by_side

PROMPT_LEN, GRID_HW, LAYERS, HEADS = 20, (3, 4), 4, 2
VISION_POS = np.arange(5, 5 + GRID_HW[0] * GRID_HW[1])  # positions 5..16


def _run(hot_cells: list[int], image_size=(400, 300), box=None) -> AttentionRun:
    """A run whose step t puts mass 0.5 on vision cell hot_cells[t] and spreads the rest on text."""
    rows = []
    for t, cell in enumerate(hot_cells):
        row = torch.zeros(LAYERS, HEADS, PROMPT_LEN + t)  # (L, H, S_t)
        row[:, :, :5] = 0.1
        row[:, :, VISION_POS[cell]] = 0.5
        row[1, 1, VISION_POS[0]] += 0.2  # one head of layer 1 also looks at cell 0
        rows.append(row.half())
    layout = VisionLayout(VISION_POS, GRID_HW, image_size, box or (0, 0, *image_size), (84, 112))
    return AttentionRun(
        [1] * PROMPT_LEN, list(range(len(hot_cells))), ["a"] * len(hot_cells), layout, list(range(LAYERS)), HEADS, rows
    )


def test_one_hot_attention_lands_on_its_cell():
    run = _run([7, 2])
    for step, cell in enumerate([7, 2]):
        heat = token_heatmap(run, step, layers=(2, 3), heads=(0, 1))
        assert heat.shape == GRID_HW and heat.dtype == np.float32
        assert np.unravel_index(heat.argmax(), heat.shape) == divmod(cell, GRID_HW[1])
        assert heat.max() == pytest.approx(0.5, abs=1e-3)


def test_reductions_and_inclusive_ranges():
    run = _run([7])
    only_layer1_head1 = token_heatmap(run, 0, layers=(1, 1), heads=(1, 1))
    assert only_layer1_head1[0, 0] == pytest.approx(0.2, abs=1e-3)
    assert token_heatmap(run, 0, reduce="max")[0, 0] == pytest.approx(0.2, abs=1e-3)
    assert token_heatmap(run, 0, reduce="min")[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert token_heatmap(run, 0, reduce="mean")[0, 0] == pytest.approx(0.2 / (LAYERS * HEADS), abs=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layers=(3, 1)), "inverted"),
        (dict(layers=(0, 9)), "outside"),
        (dict(heads=(0, 2)), "outside"),
        (dict(reduce="median"), "aggregation"),
    ],
)
def test_bad_view_arguments_say_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_heatmap(_run([7]), 0, **kwargs)


def test_step_past_the_end_is_refused():
    with pytest.raises(IndexError, match="pick 0..1"):
        token_heatmap(_run([7, 2]), 2)


def test_vision_share_sums_vision_mass():
    share = vision_share(_run([7, 2]))
    assert share.shape == (2, LAYERS, HEADS)
    assert share[0, 0, 0] == pytest.approx(0.5, abs=1e-3)
    assert share[0, 1, 1] == pytest.approx(0.7, abs=1e-3)


def test_normalisation_modes():
    heat = np.array([[0.0, 0.1], [0.2, 1.0]], dtype=np.float32)
    assert normalize_heatmap(heat).max() == 1.0 and normalize_heatmap(heat).min() == 0.0
    clipped = normalize_heatmap(heat, "percentile", percentile=50)
    assert clipped[1, 1] == 1.0 and clipped[1, 0] == 1.0 and 0 < clipped[0, 1] < 1
    shared = normalize_heatmap(heat * 0.5, "fixed", value_range=heatmap_range([heat, heat * 0.5]))
    assert shared.max() == pytest.approx(0.5)
    assert not normalize_heatmap(np.full((2, 2), 0.3)).any()


def _image(size=(400, 300)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_alpha_zero_returns_the_original_inside_the_box():
    image, heat = _image(), np.random.default_rng(1).random(GRID_HW).astype(np.float32)
    out = overlay(image, heat, (0, 0, 400, 300), alpha=0.0)
    assert out.size == image.size
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(image, dtype=int)).max() <= 1


def test_hot_cell_is_drawn_at_its_pixels_in_rgb_order():
    heat = np.zeros(GRID_HW, dtype=np.float32)
    heat[2, 1] = 1.0
    out = np.asarray(
        overlay(
            Image.new("RGB", (400, 300), "white"), heat, (0, 0, 400, 300), "jet", alpha=1.0, interpolation="nearest"
        )
    )
    cell = out[200:300, 100:200]  # row 2, column 1 of a 3x4 grid over 400x300
    assert cell[..., 0].mean() > 100 and cell[..., 2].mean() < 50  # jet's top is red, in RGB
    assert out[0:100, 0:100, 2].mean() > 100  # jet's bottom is blue


def test_outside_the_box_is_marked_and_not_colour_mapped():
    image = Image.new("RGB", (640, 480), (0, 160, 0))
    box = (80, 0, 560, 480)
    a = np.asarray(overlay(image, np.zeros(GRID_HW), box, alpha=0.6), dtype=int)
    b = np.asarray(overlay(image, np.ones(GRID_HW) + np.eye(3, 4), box, alpha=0.6), dtype=int)
    assert (a[:, :80] == b[:, :80]).all() and (a[:, 560:] == b[:, 560:]).all()  # independent of the map
    assert (a[:, :80] != np.asarray(image)[:, :80]).any()  # visibly changed
    assert (a[:, 100:540] != b[:, 100:540]).any()  # the map shows inside


@pytest.mark.parametrize("colormap", sorted(COLORMAPS))
def test_every_colormap_draws(colormap):
    out = heatmap_image(_image(), np.random.default_rng(2).random(GRID_HW), (0, 0, 400, 300), colormap)
    assert out.size == (400, 300)


def test_unknown_colormap_is_refused():
    with pytest.raises(ValueError, match="colormap"):
        overlay(_image(), np.zeros(GRID_HW), (0, 0, 400, 300), colormap="sparkles")


def test_side_by_side_and_grid():
    left, right = _image((100, 50)), _image((80, 70))
    both = side_by_side(left, right, gap=4)
    assert both.size == (184, 70)
    gridded = np.asarray(draw_grid(Image.new("RGB", (400, 300)), GRID_HW, (0, 0, 400, 300)))
    assert gridded[100, 50].tolist() == [255, 255, 255] and gridded[50, 50].tolist() == [0, 0, 0]


def test_the_colour_bar_runs_from_the_lowest_to_the_highest_colour_with_its_values():
    import cv2

    from visualization import COLORMAPS, with_colorbar

    picture = Image.new("RGB", (300, 200), (10, 20, 30))
    barred = with_colorbar(picture, "viridis", (0.0012, 0.25), "attention mass per cell")
    assert barred.size[0] == 300 and barred.size[1] > 200
    pixels = np.asarray(barred, dtype=int)
    assert (pixels[:200] == (10, 20, 30)).all()  # the picture itself is untouched
    ends = cv2.applyColorMap(np.array([[0, 255]], dtype=np.uint8), COLORMAPS["viridis"])[0, :, ::-1]  # RGB
    row = pixels[200 + 8]  # inside the bar
    assert np.abs(row[7] - ends[0]).max() <= 3 and np.abs(row[300 - 8] - ends[1]).max() <= 3
    with pytest.raises(ValueError, match="colormap"):
        with_colorbar(picture, "nope", (0, 1), "x")
