"""The committed demo model answers fresh synthetic images and looks at the object it answers about."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import demo_data  # noqa: E402
from attention_processor import token_heatmap  # noqa: E402
from config import DEMO_RANGES  # noqa: E402
from bench.bench_localization import cell_hits_box  # noqa: E402
from model_holder import ModelHolder  # noqa: E402

DEMO_DIR = REPO / "demo_model"
FRESH_SEED = 515_151  # neither training (string seeds) nor the benchmark's validation/test seeds
# Recommended ranges for the demo model (0-based inclusive), chosen by bench/bench_localization.py on
# its validation seed 20241 (not on the test seed).
LAYERS, HEADS = DEMO_RANGES
# Floors are regression guards derived from the full benchmark (test seed 31337, n=200), NOT the
# product targets (>= 0.95 accuracy, >= 0.80 pointing), which this model does not reach yet (see the
# README's demo model section). Benchmark accuracy 0.920 -> over 40 images sigma ~ 0.043, floor = 0.92 - 3 sigma.
MIN_ACCURACY = 0.79
# Benchmark pointing 0.68 (mean, layers 2-3, heads 2-3) vs shuffled-grid control 0.078 (chance 0.081):
# over 40 images sigma ~ 0.074, floor = 0.68 - 2.5 sigma ~ 0.50, six times chance, so a broken grid
# order or cell->pixel mapping (which falls to chance) fails the test.
MIN_POINTING = 0.50


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
    return [cell_hits_box(token_heatmap(run, 0, layers=LAYERS, heads=HEADS, reduce="mean"),
                          run.vision.image_box_xyxy, s.box_xyxy) for s, run in runs]


def test_pointing_game(runs):
    hits = _pointing(runs)
    assert np.mean(hits) >= MIN_POINTING, f"pointing game {sum(hits)}/{len(hits)}"
