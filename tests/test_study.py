"""Dataset studies on the demo model: every map method, manifests in every layout, localisation heads."""

import json
from pathlib import Path

import numpy as np
import pytest

import demo_data
from config import DEMO_MODEL_DIR, DEMO_RANGES
from conftest import noise_image
from model_holder import ModelHolder
from study import run_study

SEED = 626_262                      # neither training (string seeds) nor the benchmark's seeds
LAYERS, HEADS = DEMO_RANGES


@pytest.fixture(scope="module")
def holder() -> ModelHolder:
    return ModelHolder.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")


def write_manifest(folder: Path, n: int, seed: int = SEED, **extra) -> Path:
    """A JSONL manifest of `n` demo scenes, their images beside it; `extra` adds columns to every row."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, sample in enumerate(demo_data.make_samples(seed, n)):
        sample.image.save(folder / f"img{k}.png")
        rows.append({"id": f"s{k}", "image": f"img{k}.png", "prompt": sample.question, "answer": sample.answer,
                     "boxes": [list(sample.box_xyxy)], **extra})
    manifest = folder / "items.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def test_the_vit_and_relative_maps_are_scored_like_the_others(holder, tmp_path):
    manifest = write_manifest(tmp_path / "data", 3)
    results, problems = run_study(holder, manifest, tmp_path / "out", LAYERS, HEADS, max_new_tokens=2,
                                  methods=("attention", "vit"), relative=True)
    assert problems == []
    kinds = list(zip(results["method"], results["relative"], strict=True))
    assert kinds == [("attention", False), ("attention", True), ("vit", False)] * 3
    vit = results[results["method"] == "vit"]
    assert (vit["layers"] == f"{LAYERS[0]}-{LAYERS[1]}").all() and vit["iou"].between(0, 1).all()
    assert vit["pointing_hit"].mean() >= 2 / 3                                 # the patch map still points
    relative = results[results["relative"]]
    raw = results[(results["method"] == "attention") & ~results["relative"]]
    assert relative["attention_ratio"].gt(0).all()
    assert not np.allclose(relative["attention_ratio"].to_numpy(), raw["attention_ratio"].to_numpy())
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| attention, relative to a generic prompt |" in summary and "| vit |" in summary


def test_a_model_without_the_vit_map_says_so_per_item_and_keeps_the_other_methods(tmp_path):
    from tiny_models import make_tiny_model
    model = ModelHolder.load(make_tiny_model("gemma3", tmp_path / "gemma3", seed=5), device="cpu", dtype="float32")
    for k in range(2):
        noise_image(120, 90, seed=k).save(tmp_path / f"n{k}.png")
    manifest = tmp_path / "items.csv"
    manifest.write_text("id,image,prompt,boxes\n" + "".join(f'n{k},n{k}.png,What is this?,"[[0, 0, 60, 45]]"\n'
                                                            for k in range(2)))
    results, problems = run_study(model, manifest, tmp_path / "out", max_new_tokens=4, methods=("attention", "vit"))
    assert list(results["method"]) == ["attention", "attention"]
    assert len(problems) == 2 and all("vit: The ViT-combined map is not available" in p for p in problems)
    assert "items.csv line 2 (n0)" in problems[0] and "the others scored" in problems[0]
