"""Tiled families (LLaVA-NeXT, LLaVA-OneVision, InternVL, Idefics3, SmolVLM): every view of an image
maps its cells to the right tokens and pixels, proven by perturbing the pixels under one cell."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from families import frames_per_panel
from families.gemma3 import PAN_AND_SCAN_KEYS
from test_geometry import _embeds_and_layouts
from testing.tiny_tiles import TILED_FAMILIES

SIZES = [(200, 100), (90, 160), (112, 112)]  # landscape, portrait, square
MAIN_VIEW = {
    "llava_next": "tiles",
    "llava_onevision": "tiles",
    "internvl": "tiles",
    "idefics3": "tiles",
    "smolvlm": "tiles",
}
SECOND_VIEW = {
    "llava_next": "global view",
    "llava_onevision": "global view",
    "internvl": "thumbnail",
    "idefics3": "global view",
    "smolvlm": "global view",
}


def _noise(size, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _invert(pixels: np.ndarray, box) -> np.ndarray:
    """A copy with the pixels under `box` (original px, clipped to the image) inverted."""
    out = pixels.copy()
    height, width = pixels.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    out[max(0, y0) : min(height, y1), max(0, x0) : min(width, x1)] ^= 0xFF
    return out


def _change(before, after) -> torch.Tensor:
    """(S,) how much each position's decoder input moved."""
    return (after - before).abs().amax(dim=-1)


def _cells(grid_hw):
    grid_h, grid_w = grid_hw
    return sorted({(0, 0), (grid_h - 1, grid_w - 1), (grid_h // 2, grid_w // 3), (grid_h - 1, 0)})


@pytest.mark.parametrize("family", TILED_FAMILIES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_view_maps_each_cell_to_its_pixels(load_holder, family, size):
    holder = load_holder(family)
    pixels = _noise(size)
    before, layouts = _embeds_and_layouts(holder, [Image.fromarray(pixels)])
    views = [layout.view for layout in layouts]
    assert views in ([MAIN_VIEW[family], SECOND_VIEW[family]], [""])  # one view when the image is one tile
    image_positions = np.concatenate([layout.token_positions for layout in layouts])
    text = torch.ones(before.shape[0], dtype=torch.bool)
    text[torch.from_numpy(image_positions)] = False
    for layout in layouts:
        assert layout.image_index == 0 and len(layout.token_positions) == layout.num_cells
        own = torch.from_numpy(layout.token_positions)
        for row, col in _cells(layout.grid_hw):
            after, _ = _embeds_and_layouts(holder, [Image.fromarray(_invert(pixels, layout.cell_box_xyxy(row, col)))])
            moved = _change(before, after)  # (S,)
            assert float(moved[text].max()) == 0.0  # no text or marker token moves
            assert int(own[moved[own].argmax()]) == int(layout.token_positions[row * layout.grid_hw[1] + col]), (
                layout.view,
                row,
                col,
            )


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_pixels_outside_the_unpadded_tiles_reach_only_the_global_view(load_holder, family):
    """LLaVA-NeXT's un-padding drops the tile columns that are mostly padding; for a 90×160 image they
    take a few real pixel columns with them. Those pixels reach the global view and no tile cell."""
    holder = load_holder(family)
    pixels = _noise((90, 160), seed=3)
    before, (tiles, global_view) = _embeds_and_layouts(holder, [Image.fromarray(pixels)])
    x0 = tiles.image_box_xyxy[0]
    assert tiles.view == "tiles" and 4 <= x0 < 10  # the grid starts inside the image
    assert global_view.image_box_xyxy == (0.0, 0.0, 90.0, 160.0)
    edge = pixels.copy()
    edge[:, : int(x0) - 3] ^= 0xFF  # clear of the resampling kernel
    after, _ = _embeds_and_layouts(holder, [Image.fromarray(edge)])
    moved = _change(before, after)
    assert float(moved[torch.from_numpy(tiles.token_positions)].max()) == 0.0
    assert float(moved[torch.from_numpy(global_view.token_positions)].max()) > 0.0


@pytest.mark.parametrize("family", TILED_FAMILIES)
def test_second_image_views_map_to_their_own_tokens(load_holder, family):
    holder = load_holder(family)
    arrays = [_noise((200, 100), seed=1), _noise((100, 150), seed=2)]
    before, layouts = _embeds_and_layouts(holder, [Image.fromarray(a) for a in arrays])
    assert [layout.image_index for layout in layouts] == sorted(layout.image_index for layout in layouts)
    second = [layout for layout in layouts if layout.image_index == 1]
    first = np.concatenate([layout.token_positions for layout in layouts if layout.image_index == 0])
    assert second and first.max() < min(int(layout.token_positions.min()) for layout in second)
    main = second[0]
    row, col = main.grid_hw[0] // 2, main.grid_hw[1] // 2
    arrays[1] = _invert(arrays[1], main.cell_box_xyxy(row, col))
    after, _ = _embeds_and_layouts(holder, [Image.fromarray(a) for a in arrays])
    moved = _change(before, after)
    own = torch.from_numpy(main.token_positions)
    assert float(moved[torch.from_numpy(first)].max()) == 0.0
    assert int(own[moved[own].argmax()]) == int(main.token_positions[row * main.grid_hw[1] + col])


def test_a_run_names_its_views_and_the_heatmaps_pick_them(load_holder):
    from attention_processor import token_heatmap

    holder = load_holder("internvl")
    run = holder.generate(Image.fromarray(_noise((200, 100))), "Where?", max_new_tokens=2, min_new_tokens=2)
    assert [(layout.image_index, layout.view) for layout in run.visions] == [(0, "tiles"), (0, "thumbnail")]
    assert run.view_index() == 0 and run.view_index(0, "thumbnail") == 1
    assert token_heatmap(run, 0, image_idx=run.view_index(0, "thumbnail")).shape == (4, 4)
    assert token_heatmap(run, 0).shape == run.vision.grid_hw == (4, 8)
    with pytest.raises(ValueError, match="image 0: thumbnail"):
        run.view_index(0, "global view")


@contextmanager
def _pan_and_scan(holder):
    """Gemma 3's pan-and-scan turned on through the image processor (as a saved config would), for the block."""
    image_processor = holder.processor.image_processor
    saved = {key: getattr(image_processor, key, None) for key in PAN_AND_SCAN_KEYS}
    image_processor.do_pan_and_scan, image_processor.pan_and_scan_min_crop_size = True, 32
    image_processor.pan_and_scan_max_num_crops, image_processor.pan_and_scan_min_ratio_to_activate = 4, 1.2
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(image_processor, key, value)


@pytest.mark.parametrize("size", [(300, 100), (100, 260)], ids=["wide", "tall"])
def test_gemma3_pan_and_scan_crops_map_to_their_own_region(load_holder, size):
    """Pan-and-scan: the whole image first, then its crops along the longer side, each a view whose box
    is the crop; inverting a cell's pixels moves that view's token for the cell most."""
    holder = load_holder("gemma3")
    with _pan_and_scan(holder):
        pixels = _noise(size, seed=7)
        before, layouts = _embeds_and_layouts(holder, [Image.fromarray(pixels)])
        assert [layout.view for layout in layouts] == ["global view", "crop 1", "crop 2", "crop 3"]
        long_axis = 0 if size[0] > size[1] else 1
        edges = [layout.image_box_xyxy[long_axis] for layout in layouts[1:]]
        assert edges == sorted(edges) and layouts[-1].image_box_xyxy[2 + long_axis] == size[long_axis]
        for layout in layouts:
            own = torch.from_numpy(layout.token_positions)
            row, col = layout.grid_hw[0] // 2, layout.grid_hw[1] // 3
            after, _ = _embeds_and_layouts(holder, [Image.fromarray(_invert(pixels, layout.cell_box_xyxy(row, col)))])
            moved = _change(before, after)
            assert int(own[moved[own].argmax()]) == int(layout.token_positions[row * layout.grid_hw[1] + col])


def test_gemma3_pan_and_scan_rows_equal_eager(load_holder):
    holder = load_holder("gemma3")
    image = Image.fromarray(_noise((300, 100), seed=8))
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, suppress_tokens=[holder.model.config.image_token_id])
    with _pan_and_scan(holder):
        fast = holder.generate(image, "What is this?", **kwargs)
        eager = holder.generate(image, "What is this?", method="eager", **kwargs)
    assert len(fast.visions) == 4 and eager.generated_ids == fast.generated_ids
    for t in range(fast.num_steps):
        torch.testing.assert_close(
            fast.step_attention(t).float(), eager.step_attention(t).float(), rtol=2e-3, atol=2e-6
        )


VIDEO_FAMILIES = ["internvl", "llava_onevision", "smolvlm"]


def _frames(seed: int = 10) -> list[np.ndarray]:
    return [_noise((120, 90), seed=seed + i) for i in range(4)]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_frame_cell_maps_to_its_frame_and_token(load_holder, family):
    """Each frame is squashed to one grid (LLaVA-OneVision's pooled to half a side): inverting a cell of
    frame 2 moves that frame's token for the cell most, and no other frame's tokens."""
    holder = load_holder(family)
    frames = _frames()
    before, (layout,) = _embeds_and_layouts(holder, video=[Image.fromarray(f) for f in frames])
    assert layout.num_frames == 4 and layout.image_box_xyxy == (0.0, 0.0, 120.0, 90.0)
    cells, grid_w = layout.num_cells, layout.grid_hw[1]
    frame, row, col = 2, layout.grid_hw[0] // 2, grid_w - 1
    frames[frame] = _invert(frames[frame], layout.cell_box_xyxy(row, col))
    after, _ = _embeds_and_layouts(holder, video=[Image.fromarray(f) for f in frames])
    moved = _change(before, after)
    own = torch.from_numpy(layout.token_positions)
    assert int(own[moved[own].argmax()]) == int(layout.token_positions[frame * cells + row * grid_w + col])
    others = np.concatenate([layout.token_positions[f * cells : (f + 1) * cells] for f in range(4) if f != frame])
    assert float(moved[torch.from_numpy(others)].max()) == 0.0


@pytest.mark.parametrize("family", [*VIDEO_FAMILIES, "glm4v"])
def test_video_rows_equal_eager(load_holder, family):
    holder = load_holder(family)
    video = [Image.fromarray(f) for f in _frames(20)]
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, video=video)
    fast = holder.generate(None, "What happens?", **kwargs)
    eager = holder.generate(None, "What happens?", method="eager", **kwargs)
    assert fast.generated_ids == eager.generated_ids and fast.vision.num_frames == 4 // frames_per_panel(
        holder.model.config
    )  # GLM-4.1V: one time step per 2 frames
    for t in range(fast.num_steps):
        torch.testing.assert_close(
            fast.step_attention(t).float(), eager.step_attention(t).float(), rtol=2e-3, atol=2e-6
        )
    from attention_processor import token_heatmap

    assert token_heatmap(fast, 0).shape == (fast.vision.num_frames, *fast.vision.grid_hw)  # one map per step


def test_internvl_tiles_as_its_processor_does_whatever_the_saved_image_processor_says(load_holder):
    """InternVLProcessor turns tiling on by default over the image processor's saved `crop_to_patches`
    (false in the converted checkpoints); the layouts follow what the processor really does."""
    holder = load_holder("internvl")
    image_processor = holder.processor.image_processor
    saved = image_processor.crop_to_patches
    try:
        image_processor.crop_to_patches = False
        _, layouts = _embeds_and_layouts(holder, [Image.fromarray(_noise((333, 121)))])
    finally:
        image_processor.crop_to_patches = saved
    assert [layout.view for layout in layouts] == ["tiles", "thumbnail"] and layouts[0].grid_hw[1] > 4


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", [(1000, 30), (30, 1000)], ids=["wide", "tall"])
def test_an_aspect_that_unpads_every_tile_row_leaves_the_global_view(load_holder, family, size):
    """Un-padding can leave no tile cell (here at about 33:1); the global view is then the one map."""
    from attention_processor import token_heatmap

    holder = load_holder(family)
    run = holder.generate(Image.fromarray(_noise(size)), "Hi", max_new_tokens=1, min_new_tokens=1)
    assert [layout.view for layout in run.visions] == ["global view"]
    assert token_heatmap(run, 0).shape == run.vision.grid_hw == (4, 4)


def test_an_image_of_one_mistral3_token_is_refused_before_the_model(load_holder):
    holder = load_holder("mistral3")
    with pytest.raises(ValueError, match="single vision token for Mistral 3"):
        holder.generate(Image.fromarray(_noise((20, 20))), "Hi", max_new_tokens=1)
    assert holder.generate(Image.fromarray(_noise((40, 28))), "Hi", max_new_tokens=1).vision.grid_hw == (1, 2)
