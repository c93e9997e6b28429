"""The committed demo model answers fresh synthetic images and looks at the object it answers about."""

import random
from pathlib import Path

import numpy as np
import pytest

from attention_processor import token_heatmap
from bench.bench_localization import cell_hits_box
from demo import data as demo_data

REPO = Path(__file__).resolve().parents[1]
from config import DEMO_RANGES  # noqa: E402
from model_holder import ModelHolder  # noqa: E402

DEMO_DIR = REPO / "demo_model"
FRESH_SEED = 515_151  # neither training (string seeds) nor the benchmark's validation/test seeds
# Recommended ranges for the demo model (0-based inclusive), chosen by bench/bench_localization.py on
# its validation seed 20241 (not on the test seed).
LAYERS, HEADS = DEMO_RANGES
# Floors are regression guards derived from the full benchmark (test seed 31337, n=200), where the model
# meets the product targets (>= 0.95 answers, >= 0.80 pointing). Benchmark accuracy 0.975 -> over 40
# images sigma ~ 0.025, floor = 0.975 - 3 sigma ~ 0.90.
MIN_ACCURACY = 0.90
# Benchmark pointing 0.850 (mean, layers 1-3, heads 0-3) vs shuffled-grid control 0.066 (chance 0.081):
# over 40 images sigma ~ 0.056, floor = 0.850 - 2.5 sigma ~ 0.70, eight times chance, so a broken grid
# order or cell->pixel mapping (which falls to chance) fails the test.
MIN_POINTING = 0.70


@pytest.fixture(scope="module")
def holder() -> ModelHolder:
    return ModelHolder.load(DEMO_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def runs(holder):
    samples = demo_data.make_samples(FRESH_SEED, 40)
    return [(s, holder.generate(s.image, s.question, max_new_tokens=2)) for s in samples]


def test_answers_one_word_then_im_end(holder, runs):
    end_id = holder.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert holder.model.generation_config.eos_token_id == end_id
    assert all(run.generated_ids[-1] == end_id for _, run in runs)
    assert all(len(run.generated_ids) == 2 for _, run in runs)


def test_answer_accuracy(runs):
    correct = [run.generated_tokens[0].strip() == s.answer for s, run in runs]
    assert np.mean(correct) >= MIN_ACCURACY, f"{sum(correct)}/{len(correct)} answers correct"


def test_grid_covers_image(runs):
    for s, run in runs:
        width, height = s.image.size
        assert tuple(run.vision.grid_hw) == (height // 28, width // 28)
        assert tuple(run.vision.image_box_xyxy) == (0, 0, width, height)


def _pointing(runs) -> list[bool]:
    return [
        cell_hits_box(
            token_heatmap(run, 0, layers=LAYERS, heads=HEADS, reduce="mean"), run.vision.image_box_xyxy, s.box_xyxy
        )
        for s, run in runs
    ]


def test_pointing_game(runs):
    hits = _pointing(runs)
    assert np.mean(hits) >= MIN_POINTING, f"pointing game {sum(hits)}/{len(hits)}"


def test_shuffled_grid_control_falls_to_chance(runs):
    """The same maps with their cells permuted must lose the object: what points is the grid order."""
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(5):
        for s, run in runs:
            heat = token_heatmap(run, 0, layers=LAYERS, heads=HEADS, reduce="mean")
            heat = rng.permutation(heat.reshape(-1)).reshape(heat.shape)
            hits.append(cell_hits_box(heat, run.vision.image_box_xyxy, s.box_xyxy))
    assert np.mean(hits) <= 0.3 < MIN_POINTING, f"shuffled control {np.mean(hits):.3f}; chance is about 0.08"


def test_training_labels_follow_the_token_grid():
    """The training-only probes' per-token labels: row-major over the 28 px token grid, the side of
    each cell centre (middle column of an odd grid ignored), and each object's shape and colour on
    cells inside its box."""
    from demo.train import token_labels

    rng = random.Random(3)
    for size in [(224, 224), (196, 308), (308, 224)]:
        sample = demo_data.make_sample(rng, size=size)
        width, height = size
        gh, gw = height // 28, width // 28
        shape_ids, color_ids, side_ids = token_labels(sample)
        assert shape_ids.shape == color_ids.shape == side_ids.shape == (gh * gw,)
        sides = side_ids.reshape(gh, gw)
        assert (sides[:, : gw // 2] == 0).all() and (sides[:, (gw + 1) // 2 :] == 1).all()
        assert (sides[:, gw // 2] == -100).all() == (gw % 2 == 1)
        colors = list(demo_data.COLORS)
        for obj in sample.objects:  # each object owns cells, and only cells that overlap its box
            x0, y0, x1, y1 = obj.box_xyxy
            owned = np.flatnonzero(color_ids.numpy() == 1 + colors.index(obj.color))
            assert owned.size > 0, f"{obj} owns no token"
            assert (shape_ids[owned] == 1 + demo_data.SHAPES.index(obj.shape)).all()
            rows, cols = np.divmod(owned, gw)
            assert ((cols * 28 < x1) & (x0 < cols * 28 + 28) & (rows * 28 < y1) & (y0 < rows * 28 + 28)).all()


def test_words_the_demo_model_does_not_know_are_named(holder, tmp_path):
    from config import AppConfig
    from pipeline import ModelSlot, RunStore
    from ui.handlers import Handlers

    assert holder.unknown_words("What colour is the circle?") == ["colour"]
    assert holder.unknown_words("What color is the circle?") == []
    assert all(word in demo_data.guide() for word in ("circle", "red", "left", "What shape is <color>?"))
    slot = ModelSlot()
    slot.holder = holder
    h = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(256))
    image = tmp_path / "shapes.png"
    demo_data.make_sample(random.Random(0)).image.save(image)
    view = [0, *LAYERS, *HEADS, "mean", "minmax", "jet", 0.5, "overlay", False]
    *_, last = h.generate(str(image), "What colour is the circle?", 2, False, 0.7, 0.9, 0, 0, *view, None, None)
    assert "Unknown to this model" in last[1] and "colour" in last[1]


def test_a_manifest_study_scores_every_good_row_and_names_the_bad_ones(holder, tmp_path):
    import json

    import pandas as pd

    import batch

    samples = demo_data.make_samples(FRESH_SEED + 1, 6)
    rows = []
    for k, sample in enumerate(samples):
        sample.image.save(tmp_path / f"img{k}.png")
        rows.append(
            json.dumps(
                {
                    "id": f"s{k}",
                    "image": f"img{k}.png",
                    "prompt": sample.question,
                    "answer": sample.answer,
                    "boxes": [list(sample.box_xyxy)],
                }
            )
        )
    rows.insert(2, json.dumps({"id": "gone", "image": "missing.png", "prompt": "Hi", "boxes": [[0, 0, 5, 5]]}))
    rows.insert(4, "{not json")
    rows.insert(
        5, '{"id": "nan", "image": "img0.png", "prompt": "Hi", "boxes": [[null, 0, 5, 5], [0, 0, Infinity, 5]]}'
    )
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    code = batch.main(
        [
            "--model",
            str(DEMO_DIR),
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "out"),
            "--layers",
            f"{LAYERS[0]}-{LAYERS[1]}",
            "--heads",
            f"{HEADS[0]}-{HEADS[1]}",
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
            "--methods",
            "attention,rollout",
        ]
    )
    assert code == 1  # three rows were skipped
    everything = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(everything["method"]) == ["attention", "rollout"] * 6  # one row per item and method
    results = everything[everything["method"] == "attention"].reset_index(drop=True)
    rollout = everything[everything["method"] == "rollout"]
    assert (rollout["layers"] == "all").all() and rollout["iou"].between(0, 1).all()
    assert list(results["item_id"]) == [f"s{k}" for k in range(6)]
    parquet = pd.read_parquet(tmp_path / "out" / "results.parquet")  # the same rows, typed
    assert list(parquet.columns) == list(everything.columns)
    assert list(parquet["item_id"]) == list(everything["item_id"])
    assert parquet["pointing_hit"].dtype == bool
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "items.jsonl line 3" in summary and "items.jsonl line 5" in summary  # bad rows by line number
    assert "items.jsonl line 6" in summary and "four finite numbers" in summary
    # The study's pointing game agrees with the benchmark's rule on the same maps.
    expected = []
    for sample in samples:
        run = holder.generate(sample.image, sample.question, max_new_tokens=2)
        heat = token_heatmap(run, 0, layers=LAYERS, heads=HEADS, reduce="mean")
        expected.append(cell_hits_box(heat, run.vision.image_box_xyxy, sample.box_xyxy))
    assert list(results["pointing_hit"]) == expected
    assert results["attention_ratio"].between(0, 1e6).all() and results["iou"].between(0, 1).all()
    assert results["correct"].mean() >= 0.5 and "| pointing game |" in summary
