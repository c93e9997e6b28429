"""Analysis views: per-head statistics, regions, sinks, text attention, gallery and relative maps."""

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import (
    box_to_cells,
    head_matrix,
    region_share,
    region_to_text,
    relative_heatmap,
    sink_cells,
    system_positions,
    text_attention,
)
from pictures.gallery import gallery_sheet, gallery_zip, head_gallery
from records import AttentionRun, VisionLayout

GRID_HW, LAYERS, HEADS, PROMPT_LEN = (2, 3), 2, 2, 12
VISION = np.arange(3, 9)  # six cells at positions 3..8


def _run(steps: int = 3) -> AttentionRun:
    """Head (0, 0) looks only at cell 4; every other head spreads evenly; cell 0 is a sink everywhere."""
    rows = []
    for t in range(steps):
        row = torch.full((LAYERS, HEADS, PROMPT_LEN + t), 0.2 / (PROMPT_LEN + t))  # (L, H, S_t)
        row[:, :, VISION[0]] += 0.4  # the sink
        row[0, 0] = 0.0
        row[0, 0, VISION[4]] = 1.0
        rows.append((row / row.sum(-1, keepdim=True)).half())
    layout = VisionLayout(VISION, GRID_HW, (300, 200), (0.0, 0.0, 300.0, 200.0), (56, 84))
    return AttentionRun(
        list(range(100, 100 + PROMPT_LEN)),
        list(range(200, 200 + steps)),
        [f"t{t}" for t in range(steps)],
        layout,
        list(range(LAYERS)),
        HEADS,
        rows,
    )


def test_head_matrix_share_and_entropy():
    stats = head_matrix(_run(), 0, (0, 1), (0, 1))
    assert stats["share"].shape == (LAYERS, HEADS)
    assert stats["share"][0, 0] == pytest.approx(1.0, abs=1e-3)
    assert stats["entropy"][0, 0] == pytest.approx(0.0, abs=1e-3)  # one cell
    assert 0.0 < stats["entropy"][1, 1] < 1.0


def test_region_share_and_image_to_text():
    run = _run()
    region = box_to_cells(run, (100, 100, 200, 200))  # the middle cell of the bottom row
    assert region.tolist() == [[False, False, False], [False, True, False]]
    shares = region_share(run, 0, region)
    assert shares[0, 0] == pytest.approx(1.0, abs=1e-3) and shares[1, 1] < 0.1
    summary = region_to_text(run, region)
    assert summary["per_step"].shape == (3,) and summary["per_head"].shape == (LAYERS, HEADS)
    assert np.unravel_index(summary["per_head"].argmax(), (LAYERS, HEADS)) == (0, 0)
    with pytest.raises(ValueError, match="token grid"):
        region_share(run, 0, np.ones((3, 3), dtype=bool))


def test_sink_cells_are_flagged():
    sinks = sink_cells(_run(), factor=2.0)
    assert sinks[0, 0] and sinks.sum() == 1


def test_text_attention_summarises_the_image_and_renormalises_without_excluded():
    run = _run()
    run.prompt_tokens = ["<s>"] + [f"w{i}" for i in range(1, PROMPT_LEN)]
    pieces = text_attention(run, 2, exclude_positions=system_positions(run))
    kinds = [piece.kind for piece in pieces]
    assert kinds.count("image") == 1 and kinds[:3] == ["excluded"] * 3 and kinds[-2:] == ["answer"] * 2
    assert pieces[0].text == "<s>" and pieces[-1].text == "t1"
    kept = sum(piece.weight for piece in pieces if piece.kind != "excluded")
    assert kept == pytest.approx(1.0, abs=1e-3)


def test_gallery_names_are_one_based_and_zip_holds_every_head():
    run = _run()
    tiles = head_gallery(run, Image.new("RGB", (300, 200), "white"), 1, (0, 1), (0, 1))
    names = [name for name, _ in tiles]
    assert names == ["S2_L1_H1", "S2_L1_H2", "S2_L2_H1", "S2_L2_H2"]
    archive = zipfile.ZipFile(io.BytesIO(gallery_zip(tiles)))
    assert sorted(archive.namelist()) == sorted(f"{name}.png" for name in names)
    assert gallery_sheet(tiles, columns=2).size[0] > 2 * tiles[0][1].size[0]


def test_relative_heatmap():
    heat, generic = np.array([[0.2, 0.4]]), np.array([[0.1, 0.4]])
    assert relative_heatmap(heat, generic).argmax() == 0
    with pytest.raises(ValueError, match="must match"):
        relative_heatmap(heat, np.ones((2, 2)))
