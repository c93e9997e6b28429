"""Choosing layer and head ranges: the mean map of every pair of ranges, the tie rule, the ranges file."""

import json

import numpy as np
import pytest

from config import DEMO_MODEL_DIR, DEMO_RANGES, ModelRanges
from study import localization
from study.localization import (
    RangeChoice,
    choose_ranges,
    contiguous_ranges,
    pack_hits,
    pointing_at,
    range_hits,
    ranges_json,
    ranges_record,
    unpack_hits,
)


def test_every_pair_of_ranges_points_where_its_mean_map_peaks():
    rng = np.random.default_rng(0)
    values = rng.random((4, 3, 12)).astype(np.float32)  # (L, H, N)
    cell_hit = rng.random(12) < 0.4  # (N,)
    hits = range_hits(values, cell_hit)
    layer_ranges, head_ranges = contiguous_ranges(range(4)), contiguous_ranges(range(3))
    assert hits.shape == (len(layer_ranges), len(head_ranges)) == (10, 6)
    for i, (l0, l1) in enumerate(layer_ranges):
        for j, (h0, h1) in enumerate(head_ranges):
            peak = np.argmax(values[l0 : l1 + 1, h0 : h1 + 1].reshape(-1, 12).mean(axis=0))
            assert hits[i, j] == cell_hit[peak]


def test_sparse_layers_give_ranges_over_the_captured_ones():
    assert contiguous_ranges([3, 7, 11]) == [(3, 3), (3, 7), (3, 11), (7, 7), (7, 11), (11, 11)]


def test_the_most_accurate_pair_wins_and_ties_go_to_the_wider_ranges():
    layer_ranges, head_ranges = contiguous_ranges(range(2)), contiguous_ranges(range(2))  # 3 x 3 pairs
    hits = np.zeros((4, 3, 3), dtype=bool)
    hits[:3, 0, 0] = True  # layer 0, head 0: 3 of 4
    assert choose_ranges(hits, layer_ranges, head_ranges) == RangeChoice((0, 0), (0, 0), 0.75, 4)
    hits[:3, 1, 1] = True  # layers 0-1, heads 0-1: a tie, wider
    assert choose_ranges(hits, layer_ranges, head_ranges).layers == (0, 1)
    assert pointing_at(hits, layer_ranges, head_ranges, (1, 1), (1, 1)) == 0.0
    assert pointing_at(hits[:0], layer_ranges, head_ranges, (1, 1), (1, 1)) is None  # no test items: null
    with pytest.raises(ValueError, match="at least one validation item"):
        choose_ranges(hits[:0], layer_ranges, head_ranges)


def test_hits_survive_a_part_file_line():
    hits = np.random.default_rng(1).random((10, 6)) < 0.5
    assert (unpack_hits(pack_hits(hits), hits.shape) == hits).all()


def test_a_ranges_file_reads_back_and_names_its_model(tmp_path):
    record = ranges_record(
        "some/model", RangeChoice((2, 5), (1, 3), 0.8, 20), {"answer_accuracy": 0.9}, {"items": 30, "pointing": 0.7}
    )
    path = tmp_path / "ranges.json"
    path.write_text(ranges_json(record))
    assert '"layers": [2, 5]' in path.read_text()
    ranges = ModelRanges.read(path)
    assert (ranges.model, ranges.layers, ranges.heads) == ("some/model", (2, 5), (1, 3))
    assert ranges.fits("some/model") and not ranges.fits("other/model")
    assert ModelRanges(str(tmp_path), (0, 0), (0, 0)).fits(str(tmp_path / "." / ""))  # the same folder
    path.write_text(json.dumps({**record, "heads": [3, 1]}))
    with pytest.raises(ValueError, match="0 <= lo <= hi"):
        ModelRanges.read(path)


def test_the_demo_models_ranges_come_from_its_ranges_file():
    record = json.loads((DEMO_MODEL_DIR / "ranges.json").read_text())
    assert DEMO_RANGES == (tuple(record["layers"]), tuple(record["heads"]))
    assert record["chosen_by"] == localization.RULE and record["validation"]["items"] == 200
