"""The vision layout maps each grid cell to the right sequence position and image pixels."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from families import language_model, token_cell_px, vision_encoder_blocks, vision_layout
from families.llava import llava_box_xyxy
from testing.tiny_models import FAMILIES
from testing.tiny_tiles import TILED_FAMILIES

SQUARE = ("gemma3", "paligemma")  # every image squashed to one square
ONE_VIEW = [family for family in FAMILIES if family not in TILED_FAMILIES]  # tiled ones: test_tiled_geometry


@contextmanager
def _bypass_vision_blocks(model):
    """Make every vision-encoder block return its input: no attention mixes patches.

    The forward itself is replaced (not hooked) so that anything recording block outputs,
    such as the hidden states LLaVA reads its features from, sees the bypass too.
    """
    blocks = list(vision_encoder_blocks(model))
    for block in blocks:
        block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _decoder_input_embeds(holder, image) -> tuple[torch.Tensor, object]:
    """(S, hidden) embeddings entering the decoder, and the vision layout, for one image."""
    embeds, (layout,) = _embeds_and_layouts(holder, [image])
    return embeds, layout


def _cell_px(holder) -> int:
    """Pixels per grid cell side when the processor does not resize (from the config)."""
    return token_cell_px(holder.family, holder.model.config)


@pytest.mark.parametrize("family", ONE_VIEW)
@pytest.mark.parametrize("cell", [(0, 0), (1, 3), (2, 1)])
def test_one_block_of_pixels_changes_only_its_token(load_holder, family, cell):
    holder = load_holder(family)
    side = _cell_px(holder)
    rows, cols = (4, 4) if family in SQUARE else (3, 4)  # these squash every image to a square
    # Sizes that the processor keeps as they are: whole cells for Qwen, LLaVA's 56 px crop area plus a
    # margin on each side for LLaVA (so the crop offset is exercised too).
    margin = 0 if family != "llava" else side
    width, height = (cols * side + 0, rows * side) if family != "llava" else (4 * side + 2 * margin, 4 * side)
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    base_embeds, layout = _decoder_input_embeds(holder, Image.fromarray(pixels))
    if family == "llava":
        assert layout.image_box_xyxy == (margin, 0, margin + 4 * side, 4 * side)
    x0, y0 = layout.image_box_xyxy[:2]
    r, c = cell
    pixels[int(y0) + r * side : int(y0) + (r + 1) * side, int(x0) + c * side : int(x0) + (c + 1) * side] = (
        255 - pixels[int(y0) + r * side : int(y0) + (r + 1) * side, int(x0) + c * side : int(x0) + (c + 1) * side]
    )
    new_embeds, _ = _decoder_input_embeds(holder, Image.fromarray(pixels))
    changed = torch.nonzero((new_embeds - base_embeds).abs().amax(dim=-1) > 1e-6).flatten().tolist()
    grid_w = layout.grid_hw[1]
    assert changed == [int(layout.token_positions[r * grid_w + c])]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
@pytest.mark.parametrize("size", [(1000, 667), (300, 900), (64, 64)])
def test_qwen_grid_covers_whole_image(load_holder, family, size):
    holder = load_holder(family)
    image = Image.new("RGB", size, (200, 100, 50))
    inputs = holder.build_inputs(image, "Hi")
    layout = vision_layout(holder.family, holder.model.config, holder.processor, inputs, image.size)
    t, h, w = inputs["image_grid_thw"][0].tolist()
    merge = holder.model.config.vision_config.spatial_merge_size
    assert layout.grid_hw == (h // merge, w // merge)
    assert layout.image_box_xyxy == (0.0, 0.0, float(size[0]), float(size[1]))
    assert len(layout.token_positions) == layout.grid_hw[0] * layout.grid_hw[1]
    ids = inputs["input_ids"][0]
    assert bool((ids[torch.from_numpy(layout.token_positions)] == holder.model.config.image_token_id).all())
    # Aspect ratio is kept to within one cell.
    assert abs(layout.grid_hw[1] / layout.grid_hw[0] - size[0] / size[1]) < size[0] / size[1] * 0.5


def _llava_15_processor():
    from transformers import CLIPImageProcessor

    # The settings of llava-hf/llava-1.5-7b-hf's processor.
    return CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


@pytest.mark.parametrize(
    "size,box",
    [
        ((640, 480), (80, 0, 560, 480)),
        ((480, 640), (0, 80, 480, 560)),
        ((336, 336), (0, 0, 336, 336)),
        ((1000, 500), (250, 0, 750, 500)),
    ],
)
def test_llava_15_crop_box(size, box):
    assert llava_box_xyxy(_llava_15_processor(), size) == pytest.approx(box, abs=1.5)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 777)])
def test_llava_crop_box_matches_what_the_processor_keeps(size):
    """Paint the box red and the rest blue: the processed image holds red only."""
    processor = _llava_15_processor()
    x0, y0, x1, y1 = (int(round(v)) for v in llava_box_xyxy(processor, size))
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    canvas[:, :] = (0, 0, 255)
    canvas[y0:y1, x0:x1] = (255, 0, 0)
    pixels = processor(images=Image.fromarray(canvas), return_tensors="pt")["pixel_values"][0]  # (3, 336, 336)
    red, blue = pixels[0], pixels[2]
    edge = 3  # resampling blends a couple of pixels at the border
    assert float((red[edge:-edge, edge:-edge] > blue[edge:-edge, edge:-edge]).float().mean()) == 1.0


def test_llava_padded_processor_box_extends_past_image():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor.do_pad = True
    assert llava_box_xyxy(processor, (640, 480)) == pytest.approx((0, -80, 640, 560), abs=1.5)


def test_grid_count_mismatch_is_reported(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    inputs = holder.build_inputs(dummy_image, "Hi")
    inputs["image_grid_thw"] = inputs["image_grid_thw"] * torch.tensor([[1, 2, 1]])
    with pytest.raises(ValueError, match=r"image tokens .* need 40"):
        vision_layout(holder.family, holder.model.config, holder.processor, inputs, dummy_image.size)


def _embeds_and_layouts(holder, images=None, video=None):
    """(S, hidden) decoder input embeddings and the layouts, for several images or a video."""
    from families import vision_layouts

    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"][0].detach().clone()

    inputs = holder.build_inputs(images, "Where?", video=video)
    sizes = [im.size for im in images] if images else [video[0].size]
    layouts = vision_layouts(holder.family, holder.model.config, holder.processor, inputs, sizes, video=bool(video))
    handle = language_model(holder.model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), _bypass_vision_blocks(holder.model):
            holder.model(**inputs)
    finally:
        handle.remove()
    return captured["embeds"], layouts


def _changed_positions(before, after) -> list[int]:
    return torch.nonzero((after - before).abs().amax(dim=-1) > 1e-6).flatten().tolist()


@pytest.mark.parametrize("family", ONE_VIEW)
def test_second_image_block_maps_to_its_own_token(load_holder, family):
    holder = load_holder(family)
    side = _cell_px(holder)
    rng = np.random.default_rng(5)
    shapes = (
        [(2 * side, 3 * side), (4 * side, 2 * side)] if family not in ("llava", *SQUARE) else [(4 * side, 4 * side)] * 2
    )  # these two see every image as one square
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in shapes]
    before, layouts = _embeds_and_layouts(holder, [Image.fromarray(a) for a in arrays])
    assert len(layouts) == 2 and layouts[0].token_positions[-1] < layouts[1].token_positions[0]
    r, c = 1, 1
    arrays[1][r * side : (r + 1) * side, c * side : (c + 1) * side] ^= 0xFF
    after, _ = _embeds_and_layouts(holder, [Image.fromarray(a) for a in arrays])
    assert _changed_positions(before, after) == [int(layouts[1].token_positions[r * layouts[1].grid_hw[1] + c])]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_video_frame_block_maps_to_its_frame_and_cell(load_holder, family):
    holder = load_holder(family)
    side = _cell_px(holder)
    rng = np.random.default_rng(6)
    frames = [rng.integers(0, 256, (3 * side, 4 * side, 3), dtype=np.uint8) for _ in range(4)]
    before, (layout,) = _embeds_and_layouts(holder, video=[Image.fromarray(f) for f in frames])
    assert layout.num_frames == 2 and layout.grid_hw == (3, 4)
    frame, r, c = 1, 2, 3  # frames 2 and 3 form temporal step 1
    for f in (2, 3):
        frames[f][r * side : (r + 1) * side, c * side : (c + 1) * side] ^= 0xFF
    after, _ = _embeds_and_layouts(holder, video=[Image.fromarray(f) for f in frames])
    cells = layout.grid_hw[0] * layout.grid_hw[1]
    assert _changed_positions(before, after) == [int(layout.token_positions[frame * cells + r * 4 + c])]
